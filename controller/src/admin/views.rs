//! What the admin API returns and accepts: serde types shared by the server, the
//! [`AdminBackend`] the daemon implements, and the CLI that prints them.

use std::{collections::BTreeMap, fmt, future::Future, pin::Pin, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::{
    model::{Fingerprint, Role, TrustLevel, UnixMs},
    proto::pb,
};

/// A boxed future, so the backend trait stays object safe without the async-trait crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the daemon gives the admin API. Every method answers one route; errors map to
/// status codes through [`BackendError`].
pub trait AdminBackend: Send + Sync + 'static {
    /// `GET /v1/status`; also feeds the `p2pcdn_peers` and `p2pcdn_arrangements` gauges at
    /// every scrape of `/metrics`.
    fn status(&self) -> BoxFuture<'_, Result<StatusView, BackendError>>;
    /// `GET /v1/peers`: every known peer (registry and store).
    fn peers(&self) -> BoxFuture<'_, Result<Vec<PeerView>, BackendError>>;
    /// `GET /v1/arrangements[?state=&role=&peer=]`.
    fn arrangements(
        &self,
        filter: ArrangementFilter,
    ) -> BoxFuture<'_, Result<Vec<ArrangementView>, BackendError>>;
    /// `GET /v1/arrangements/{id}`: one arrangement with its history.
    /// [`BackendError::NotFound`] if there is no such arrangement.
    fn arrangement(&self, id: String) -> BoxFuture<'_, Result<ArrangementDetail, BackendError>>;
    /// `GET /v1/policy`: the effective policy (config plus operator rules).
    fn policy(&self) -> BoxFuture<'_, Result<PolicyView, BackendError>>;
    /// `GET /v1/negotiations`: recent negotiations, newest first.
    fn negotiations(&self) -> BoxFuture<'_, Result<Vec<NegotiationView>, BackendError>>;
    /// `POST /v1/policy/rules`: stores an operator rule and applies it at once.
    fn add_policy_rule(
        &self,
        rule: NewPolicyRule,
    ) -> BoxFuture<'_, Result<PolicyRuleView, BackendError>>;
    /// `DELETE /v1/policy/rules/{id}`. [`BackendError::NotFound`] if there is no such rule.
    fn remove_policy_rule(&self, id: i64) -> BoxFuture<'_, Result<(), BackendError>>;
    /// `POST /v1/negotiate`: runs a negotiation to its end (bounded by the policy's
    /// negotiation timeout) and reports the outcome. [`BackendError::NotFound`] for an
    /// unknown service.
    fn negotiate(
        &self,
        request: NegotiateRequest,
    ) -> BoxFuture<'_, Result<NegotiationView, BackendError>>;
    /// `POST /v1/arrangements/{id}/disband`: disbands with the peer and returns the
    /// arrangement as it is afterwards. [`BackendError::Conflict`] if its state does not allow
    /// it (already ended).
    fn disband(
        &self,
        id: String,
        reason: String,
    ) -> BoxFuture<'_, Result<ArrangementView, BackendError>>;
}

/// Why the backend could not answer; each kind has its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 400: a value the backend refuses (e.g. a rule that already exists).
    #[error("{0}")]
    Invalid(String),
    /// 409: the state does not allow it (e.g. disbanding an ended arrangement).
    #[error("{0}")]
    Conflict(String),
    /// 503: shutting down or not ready.
    #[error("{0}")]
    Unavailable(String),
    /// 500: the store or another internal part failed.
    #[error("{0}")]
    Internal(String),
}

/// The body of every error response: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Liveness of a peer as gossip sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LivenessView {
    Alive,
    Suspect,
    Dead,
}

impl LivenessView {
    pub const ALL: [Self; 3] = [Self::Alive, Self::Suspect, Self::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Suspect => "suspect",
            Self::Dead => "dead",
        }
    }
}

/// [`pb::ArrangementState`] with the names the API and CLI use (`active`, `disbanded`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateView {
    Requested,
    Offered,
    Accepted,
    Active,
    Disbanding,
    Disbanded,
    Cancelled,
}

impl StateView {
    pub const ALL: [Self; 7] = [
        Self::Requested,
        Self::Offered,
        Self::Accepted,
        Self::Active,
        Self::Disbanding,
        Self::Disbanded,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Offered => "offered",
            Self::Accepted => "accepted",
            Self::Active => "active",
            Self::Disbanding => "disbanding",
            Self::Disbanded => "disbanded",
            Self::Cancelled => "cancelled",
        }
    }

    /// `None` for `ARRANGEMENT_STATE_UNSPECIFIED`.
    pub fn from_pb(state: pb::ArrangementState) -> Option<Self> {
        Some(match state {
            pb::ArrangementState::Unspecified => return None,
            pb::ArrangementState::Requested => Self::Requested,
            pb::ArrangementState::Offered => Self::Offered,
            pb::ArrangementState::Accepted => Self::Accepted,
            pb::ArrangementState::Active => Self::Active,
            pb::ArrangementState::Disbanding => Self::Disbanding,
            pb::ArrangementState::Disbanded => Self::Disbanded,
            pb::ArrangementState::Cancelled => Self::Cancelled,
        })
    }

    pub fn to_pb(self) -> pb::ArrangementState {
        match self {
            Self::Requested => pb::ArrangementState::Requested,
            Self::Offered => pb::ArrangementState::Offered,
            Self::Accepted => pb::ArrangementState::Accepted,
            Self::Active => pb::ArrangementState::Active,
            Self::Disbanding => pb::ArrangementState::Disbanding,
            Self::Disbanded => pb::ArrangementState::Disbanded,
            Self::Cancelled => pb::ArrangementState::Cancelled,
        }
    }
}

impl fmt::Display for StateView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StateView {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown arrangement state {s:?} (one of: {})",
                    Self::ALL.map(Self::as_str).join(", ")
                )
            })
    }
}

/// Capacity figures (own resources, spare capacity, granted capacity).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityView {
    pub new_connections_per_s: u64,
    pub egress_mbps: u64,
    pub storage_bytes: u64,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub name: String,
    pub organisation: Option<String>,
    pub fingerprint: Fingerprint,
    /// The crate version of the daemon.
    pub version: String,
    pub started_ms: UnixMs,
    /// gRPC mTLS listener (peers).
    pub control_listen: String,
    /// Gossip UDP listener.
    pub gossip_listen: String,
    /// This admin API's listener.
    pub admin_listen: String,
    /// This node's own capacity (config `[resources]`).
    pub capacity: CapacityView,
    /// What is left after active arrangements as a provider.
    pub spare: CapacityView,
    /// Peers by liveness; every state is present (zero included).
    pub peers: BTreeMap<LivenessView, u64>,
    /// Arrangements by state; every state is present (zero included).
    pub arrangements: BTreeMap<StateView, u64>,
    /// Negotiations still running.
    pub negotiations_running: u64,
}

/// `GET /v1/peers`: one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub fingerprint: Fingerprint,
    /// The certificate's common name, or the advertised name.
    pub name: Option<String>,
    pub organisation: Option<String>,
    /// `None` if never admitted over TLS yet (only known by gossip).
    pub trust: Option<TrustLevel>,
    pub liveness: LivenessView,
    /// The peer's gRPC endpoint (host:port).
    pub control_endpoint: Option<String>,
    pub regions: Vec<String>,
    /// Redirection modes (`dsr-gue`, `dsr-ipip`, `http-redirect`).
    pub modes: Vec<String>,
    /// Spare capacity from its latest advertisement.
    pub spare: Option<CapacityView>,
    pub advert_sequence: Option<u64>,
    pub advert_expires_ms: Option<UnixMs>,
    pub last_seen_ms: Option<UnixMs>,
    pub reputation_ppm: Option<u32>,
    /// This node's own assessment as a primary (standing, trust, per-dimension scores,
    /// evidence, decisions), when it has observed or heard of the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assessment: Option<serde_json::Value>,
}

/// Filters of `GET /v1/arrangements`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrangementFilter {
    pub state: Option<StateView>,
    pub role: Option<Role>,
    pub peer: Option<Fingerprint>,
}

/// Usage counted by one side.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageView {
    pub connections: u64,
    pub bytes: u64,
    pub packets: u64,
}

/// Terms of an arrangement (the accepted offer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermsView {
    pub new_connections_per_s: u64,
    pub egress_mbps: u64,
    pub price_per_gb_micros: u64,
    pub price_per_1000_connections_micros: u64,
    pub currency: String,
    pub availability_ppm: u32,
    pub p99_latency_ms: u32,
    pub mode: String,
}

/// One arrangement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrangementView {
    pub id: String,
    /// Which side this node is on.
    pub role: Role,
    pub peer: Fingerprint,
    pub peer_name: Option<String>,
    pub state: StateView,
    pub service: String,
    /// Set when activated from a long-term agreement.
    pub agreement_id: Option<String>,
    pub terms: Option<TermsView>,
    pub created_ms: UnixMs,
    pub updated_ms: UnixMs,
    pub activated_ms: Option<UnixMs>,
    pub expires_ms: Option<UnixMs>,
    pub ended_ms: Option<UnixMs>,
    pub end_reason: Option<String>,
    /// Usage as this node counted it.
    pub usage_local: UsageView,
    /// Usage as the peer reported it.
    pub usage_peer: UsageView,
}

/// One step of an arrangement's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrangementEventView {
    /// `None` for the event that created it.
    pub from: Option<StateView>,
    pub to: StateView,
    pub at_ms: UnixMs,
    pub detail: String,
}

/// `GET /v1/arrangements/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrangementDetail {
    #[serde(flatten)]
    pub arrangement: ArrangementView,
    pub events: Vec<ArrangementEventView>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Allow,
    Deny,
}

impl RuleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// Whom a rule is about: exactly one of a fingerprint or an organisation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleSubject {
    Fingerprint(Fingerprint),
    Organisation(String),
}

impl fmt::Display for RuleSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fingerprint(fp) => write!(f, "fingerprint {fp}"),
            Self::Organisation(org) => write!(f, "organisation {org:?}"),
        }
    }
}

/// Longest organisation name a rule accepts (X.509 caps O at 64; leave room).
pub const MAX_ORGANISATION_LEN: usize = 256;

/// `POST /v1/policy/rules` body: `{"action": "allow"|"deny", "fingerprint": "…"}` or
/// `{"action": …, "organisation": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPolicyRule {
    pub action: RuleAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organisation: Option<String>,
}

impl NewPolicyRule {
    /// The rule's subject; a one-line reason if not exactly one is given or it is malformed.
    pub fn subject(&self) -> Result<RuleSubject, String> {
        match (&self.fingerprint, &self.organisation) {
            (Some(fp), None) => Ok(RuleSubject::Fingerprint(*fp)),
            (None, Some(org)) => {
                let trimmed = org.trim();
                if trimmed.is_empty() {
                    Err("organisation must not be empty".to_owned())
                } else if trimmed.len() > MAX_ORGANISATION_LEN {
                    Err(format!(
                        "organisation is longer than {MAX_ORGANISATION_LEN} bytes"
                    ))
                } else if trimmed.chars().any(char::is_control) {
                    Err("organisation must not contain control characters".to_owned())
                } else {
                    Ok(RuleSubject::Organisation(trimmed.to_owned()))
                }
            }
            (Some(_), Some(_)) => {
                Err("give either fingerprint or organisation, not both".to_owned())
            }
            (None, None) => Err("give a fingerprint or an organisation".to_owned()),
        }
    }
}

/// Where a rule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleSource {
    /// `[policy] allow/deny` in the config file (change it there).
    Config,
    /// Added through the admin API (stored, removable by id).
    Operator,
}

/// One allow/deny rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRuleView {
    /// Set for operator rules (the id `DELETE /v1/policy/rules/{id}` takes).
    pub id: Option<i64>,
    pub action: RuleAction,
    pub subject: RuleSubject,
    pub source: RuleSource,
    pub created_ms: Option<UnixMs>,
}

/// A long-term agreement from the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LongTermView {
    pub agreement_id: String,
    pub peer: Fingerprint,
    /// Our side in it.
    pub role: Role,
    pub new_connections_per_s: u64,
    pub duration_s: u64,
}

/// `GET /v1/policy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    /// `allow-list` or `first-contact`.
    pub admit_unknown: String,
    pub rules: Vec<PolicyRuleView>,
    pub min_reputation_ppm: Option<u32>,
    pub offer_share_percent: u32,
    /// Our list prices as a provider.
    pub price_per_gb_micros: u64,
    pub price_per_1000_connections_micros: u64,
    pub currency: String,
    /// Our ceilings as a primary.
    pub max_price_per_gb_micros: u64,
    pub max_price_per_1000_connections_micros: u64,
    pub long_term: Vec<LongTermView>,
}

/// `POST /v1/negotiate` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NegotiateRequest {
    /// A `[[services]]` name from the config.
    pub service: String,
    /// Capacity to cover; default: what the mediator computes for the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_connections_per_s: Option<u64>,
    /// Default: the service's `duration_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u64>,
}

/// Longest service name the API accepts.
pub const MAX_SERVICE_NAME_LEN: usize = 128;
/// Upper bound of a negotiation's duration (one year).
pub const MAX_DURATION_S: u64 = 366 * 24 * 3600;

impl NegotiateRequest {
    /// A one-line reason if a field is out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.service.trim().is_empty() {
            return Err("service must not be empty".to_owned());
        }
        if self.service.len() > MAX_SERVICE_NAME_LEN {
            return Err(format!(
                "service is longer than {MAX_SERVICE_NAME_LEN} bytes"
            ));
        }
        if self.new_connections_per_s == Some(0) {
            return Err("new_connections_per_s must be at least 1".to_owned());
        }
        match self.duration_s {
            Some(0) => Err("duration_s must be at least 1".to_owned()),
            Some(d) if d > MAX_DURATION_S => {
                Err(format!("duration_s must be at most {MAX_DURATION_S}"))
            }
            _ => Ok(()),
        }
    }
}

/// How a negotiation ended (or that it has not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NegotiationState {
    Running,
    Succeeded,
    Partial,
    Failed,
    Abandoned,
}

impl NegotiationState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Partial => "partial",
            Self::Failed => "failed",
            Self::Abandoned => "abandoned",
        }
    }
}

/// One negotiation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NegotiationView {
    pub request_id: String,
    pub service: String,
    pub state: NegotiationState,
    pub started_ms: UnixMs,
    pub ended_ms: Option<UnixMs>,
    pub requested_connections_per_s: u64,
    pub covered_connections_per_s: u64,
    /// Arrangements it created (ids).
    pub arrangements: Vec<String>,
    pub detail: String,
}

/// `POST /v1/arrangements/{id}/disband` body (`{}` is fine: the reason defaults).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisbandRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Longest free-text reason accepted.
pub const MAX_REASON_LEN: usize = 256;
/// The reason recorded when the operator gives none.
pub const DEFAULT_DISBAND_REASON: &str = "operator request";
