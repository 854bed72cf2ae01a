//! Durable state in one SQLite file: peers, operator policy rules, advertisements,
//! arrangements with their state machine and history, the usage ledger, negotiations and
//! reputation.
//!
//! Every state change is one SQLite transaction, so a `kill -9` at any moment leaves either the
//! state before or the state after it. The database runs in WAL mode with
//! `synchronous = NORMAL`: a committed transaction survives a crash of the process (it is in the
//! WAL, which the OS keeps); a power loss may lose the last transactions but never leaves a
//! half-written one. History tables (`arrangement_events`, `usage_ledger`) are append-only,
//! enforced by triggers. The API is synchronous: each call is short, async callers call it
//! directly (or through `spawn_blocking` when they batch).

mod schema;

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use prost::Message;
use rusqlite::{
    Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params,
    types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef},
};
use serde::{Deserialize, Serialize};

use crate::{
    model::{Fingerprint, Role, TrustLevel, UnixMs},
    proto::pb,
};

/// The arrangement lifecycle, as on the wire.
pub type State = pb::ArrangementState;

/// At most this many rows come back from a listing call.
pub const MAX_LIST: usize = 10_000;
/// Free-text columns (event details, reasons, notes) are cut to this many characters.
pub const MAX_TEXT_CHARS: usize = 1024;

/// Errors of the store. Messages are one line.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("store: cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: migration to schema version {version} failed: {source}")]
    Migration {
        version: usize,
        source: rusqlite::Error,
    },
    #[error(
        "store: schema version {found} is newer than this build knows ({known}); use a newer p2pcdn or restore a backup"
    )]
    SchemaTooNew { found: i64, known: usize },
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("illegal arrangement transition {} -> {}", state_name(*.from), state_name(*.to))]
    IllegalTransition { from: State, to: State },
    #[error("arrangement {id}: state is {}, expected one of {}", state_name(*.current), state_list(.expected))]
    UnexpectedState {
        id: String,
        current: State,
        expected: Vec<State>,
    },
    #[error("arrangement {0} is not in the store")]
    UnknownArrangement(String),
    #[error("arrangement {0} already exists")]
    DuplicateArrangement(String),
    #[error("arrangement {id}: {reason}")]
    InvalidArrangement { id: String, reason: String },
    #[error("negotiation {0} is not in the store")]
    UnknownNegotiation(String),
    #[error("negotiation {0} already exists")]
    DuplicateNegotiation(String),
    #[error("negotiation {request_id} already ended as {state}")]
    NegotiationEnded {
        request_id: String,
        state: NegotiationState,
    },
    #[error("negotiation {0}: `running` is not an outcome")]
    NotAnOutcome(String),
    #[error("store: {field} {value} does not fit a signed 64-bit integer")]
    OutOfRange { field: &'static str, value: u64 },
    #[error("store: backup target {0} already exists")]
    BackupExists(PathBuf),
    #[error("store: consistency check failed: {0}")]
    Inconsistent(String),
}

/// The human name of a state (`active`, `disbanding`, …).
pub fn state_name(state: State) -> &'static str {
    match state {
        State::Unspecified => "unspecified",
        State::Requested => "requested",
        State::Offered => "offered",
        State::Accepted => "accepted",
        State::Active => "active",
        State::Disbanding => "disbanding",
        State::Disbanded => "disbanded",
        State::Cancelled => "cancelled",
    }
}

/// Parses a state name as [`state_name`] prints it.
pub fn parse_state(text: &str) -> Option<State> {
    ALL_STATES
        .iter()
        .copied()
        .find(|s| state_name(*s) == text.trim().to_ascii_lowercase())
}

const ALL_STATES: [State; 7] = [
    State::Requested,
    State::Offered,
    State::Accepted,
    State::Active,
    State::Disbanding,
    State::Disbanded,
    State::Cancelled,
];

fn state_list(states: &[State]) -> String {
    if states.is_empty() {
        return "any".to_owned();
    }
    states
        .iter()
        .map(|s| state_name(*s))
        .collect::<Vec<_>>()
        .join("|")
}

/// The arrangement state machine: is `from -> to` an edge?
///
/// Requested → Offered | Cancelled; Offered → Offered (counter-offer) | Accepted | Cancelled;
/// Accepted → Active | Cancelled; Active → Disbanding | Disbanded; Disbanding → Disbanded;
/// Disbanded and Cancelled are terminal.
pub fn legal_edge(from: State, to: State) -> bool {
    use pb::ArrangementState::{
        Accepted, Active, Cancelled, Disbanded, Disbanding, Offered, Requested,
    };
    matches!(
        (from, to),
        (Requested, Offered | Cancelled)
            | (Offered, Offered | Accepted | Cancelled)
            | (Accepted, Active | Cancelled)
            | (Active, Disbanding | Disbanded)
            | (Disbanding, Disbanded)
    )
}

/// Disbanded and Cancelled: nothing follows.
pub fn is_terminal(state: State) -> bool {
    matches!(state, State::Disbanded | State::Cancelled)
}

/// Liveness of a peer as membership gossip sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Alive,
    Suspect,
    Dead,
}

/// An operator rule: allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Allow,
    Deny,
}

/// What a policy rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleSubject {
    Fingerprint(Fingerprint),
    Organisation(String),
}

/// Who counted a usage entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// This node's own count.
    Local,
    /// The count the other side reported.
    Peer,
}

/// A running count (heartbeat) or the count at disband (final).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageKind {
    Heartbeat,
    Final,
}

/// Where a negotiation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NegotiationState {
    Running,
    /// The requirement is covered.
    Succeeded,
    /// Some of it is covered.
    Partial,
    /// Nothing is covered.
    Failed,
    /// Interrupted (the node restarted while it ran).
    Abandoned,
}

macro_rules! text_enum {
    ($ty:ty, $what:literal, $($variant:path => $text:literal),+ $(,)?) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $($variant => $text),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($variant),)+
                    other => Err(format!(concat!("unknown ", $what, " {:?}"), other)),
                }
            }
        }
    };
}

text_enum!(Liveness, "liveness", Liveness::Alive => "alive", Liveness::Suspect => "suspect", Liveness::Dead => "dead");
text_enum!(RuleAction, "rule action", RuleAction::Allow => "allow", RuleAction::Deny => "deny");
text_enum!(UsageSource, "usage source", UsageSource::Local => "local", UsageSource::Peer => "peer");
text_enum!(UsageKind, "usage kind", UsageKind::Heartbeat => "heartbeat", UsageKind::Final => "final");
text_enum!(
    NegotiationState,
    "negotiation state",
    NegotiationState::Running => "running",
    NegotiationState::Succeeded => "succeeded",
    NegotiationState::Partial => "partial",
    NegotiationState::Failed => "failed",
    NegotiationState::Abandoned => "abandoned",
);

/// A peer this node has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerRecord {
    pub fingerprint: Fingerprint,
    pub name: String,
    pub organisation: Option<String>,
    pub trust: TrustLevel,
    pub liveness: Liveness,
    /// When `liveness` last changed.
    pub liveness_ms: UnixMs,
    /// gRPC control endpoint, `host:port`.
    pub control_endpoint: String,
    pub first_seen_ms: UnixMs,
    pub last_seen_ms: UnixMs,
    /// The SubjectPublicKeyInfo (DER) the fingerprint is the hash of: the pin.
    #[serde(skip)]
    pub pinned_spki: Vec<u8>,
}

/// An operator's policy rule (changed at run time through the admin API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyRule {
    /// Assigned by the store; ignored by [`Store::add_policy_rule`].
    pub id: i64,
    pub action: RuleAction,
    pub subject: RuleSubject,
    pub note: String,
    pub created_ms: UnixMs,
}

/// A verified advertisement as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertRecord {
    pub node_id: Fingerprint,
    pub sequence: u64,
    /// The `SignedAdvertisement` bytes, exactly as received.
    pub signed: Vec<u8>,
    pub received_ms: UnixMs,
    pub expires_ms: UnixMs,
}

/// A peering arrangement, on either side.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrangementRecord {
    pub id: String,
    /// Our side of it.
    pub role: Role,
    /// The other side.
    pub peer: Fingerprint,
    pub state: State,
    pub request_id: String,
    pub offer_id: Option<String>,
    pub agreement_id: Option<String>,
    /// The other side's identifier for this arrangement when it differs from `id`.
    pub peer_ref: Option<String>,
    /// The accepted offer (or the long-term agreement's terms).
    pub terms: Option<pb::Offer>,
    pub service: Option<pb::ServiceSpec>,
    pub requirements: Option<pb::ServiceRequirements>,
    /// The other side's endpoints (provider: the primary's; primary: the provider's).
    pub peer_endpoints: Option<pb::Endpoints>,
    /// Outer source addresses the primary tunnels from (the provider's decap allow-list).
    pub tunnel_sources: Vec<String>,
    pub created_ms: UnixMs,
    pub updated_ms: UnixMs,
    pub activated_ms: Option<UnixMs>,
    pub expires_ms: Option<UnixMs>,
    pub ended_ms: Option<UnixMs>,
    pub end_reason: Option<String>,
    pub settlement: Option<pb::Settlement>,
}

impl ArrangementRecord {
    /// A fresh record in `state` with every optional column empty.
    pub fn new(
        id: impl Into<String>,
        role: Role,
        peer: Fingerprint,
        state: State,
        request_id: impl Into<String>,
        now: UnixMs,
    ) -> Self {
        Self {
            id: id.into(),
            role,
            peer,
            state,
            request_id: request_id.into(),
            offer_id: None,
            agreement_id: None,
            peer_ref: None,
            terms: None,
            service: None,
            requirements: None,
            peer_endpoints: None,
            tunnel_sources: Vec::new(),
            created_ms: now,
            updated_ms: now,
            activated_ms: None,
            expires_ms: None,
            ended_ms: None,
            end_reason: None,
            settlement: None,
        }
    }
}

/// Columns a transition sets besides the state (`None`: unchanged).
///
/// `updated_ms` is always the transition time; `activated_ms` defaults to it on the way into
/// Active, and `ended_ms` is set on the way into a terminal state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArrangementChanges {
    pub offer_id: Option<String>,
    pub agreement_id: Option<String>,
    pub peer_ref: Option<String>,
    pub terms: Option<pb::Offer>,
    pub service: Option<pb::ServiceSpec>,
    pub requirements: Option<pb::ServiceRequirements>,
    pub peer_endpoints: Option<pb::Endpoints>,
    pub tunnel_sources: Option<Vec<String>>,
    pub activated_ms: Option<UnixMs>,
    pub expires_ms: Option<UnixMs>,
    pub end_reason: Option<String>,
    pub settlement: Option<pb::Settlement>,
}

/// One line of an arrangement's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrangementEvent {
    /// Store-wide order.
    pub seq: i64,
    pub arrangement: String,
    /// `None` for the event that created the arrangement.
    pub from: Option<State>,
    pub to: State,
    pub at_ms: UnixMs,
    pub detail: String,
}

/// Which arrangements to list. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArrangementFilter {
    pub role: Option<Role>,
    /// Any of these states (empty: any state).
    pub states: Vec<State>,
    pub peer: Option<Fingerprint>,
    pub request_id: Option<String>,
    /// At most this many, newest first (`None`: [`MAX_LIST`]).
    pub limit: Option<usize>,
}

/// One usage-ledger line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEntry {
    pub arrangement: String,
    pub at_ms: UnixMs,
    pub source: UsageSource,
    pub kind: UsageKind,
    /// Counts so far (cumulative since activation), as heartbeats carry them.
    pub connections: u64,
    pub bytes: u64,
    pub packets: u64,
}

/// The latest counts of one side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UsageCounts {
    pub connections: u64,
    pub bytes: u64,
    pub packets: u64,
    /// When counted (0: never).
    pub at_ms: UnixMs,
    /// The count is the final one.
    pub is_final: bool,
}

/// A negotiation run by this node as primary.
#[derive(Debug, Clone, PartialEq)]
pub struct NegotiationRecord {
    pub request_id: String,
    pub service: String,
    pub requirements: Option<pb::ServiceRequirements>,
    pub state: NegotiationState,
    pub started_ms: UnixMs,
    pub ended_ms: Option<UnixMs>,
    pub covered_conn_per_s: u64,
    pub detail: String,
}

/// The latest reputation statement of one reporter about one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReputationRecord {
    pub subject: Fingerprint,
    pub reporter: Fingerprint,
    pub sequence: u64,
    pub score_ppm: u32,
    pub samples: u64,
    pub mismatches: u64,
    pub unanswered: u64,
    pub window_end_ms: UnixMs,
    pub received_ms: UnixMs,
    /// The `SignedReputationReport` bytes, exactly as received.
    pub signed: Vec<u8>,
}

/// What [`Store::verify`] looked at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub arrangements: usize,
    pub events: usize,
    pub ledger_entries: usize,
}

/// The store. Cheap to clone (one connection behind a mutex).
#[derive(Debug, Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: Option<PathBuf>,
}

impl Store {
    /// Opens (creating it and its directory if needed) the database at `path` and brings its
    /// schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        // journal_mode answers with the mode in effect; a file that cannot do WAL would say so.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Open {
                path: path.to_owned(),
                source: rusqlite::Error::InvalidParameterName(format!(
                    "journal mode is {mode}, WAL needed"
                )),
            });
        }
        Self::prepare(conn, Some(path.to_owned()))
    }

    /// A private database in memory (tests, tools).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: PathBuf::from(":memory:"),
            source,
        })?;
        Self::prepare(conn, None)
    }

    fn prepare(mut conn: Connection, path: Option<PathBuf>) -> Result<Self, StoreError> {
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The database file (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The schema version (number of migrations applied).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let conn = self.lock();
        Ok(conn.query_row("PRAGMA user_version", [], |row| row.get(0))?)
    }

    /// How many migrations this build knows.
    pub fn latest_schema_version() -> usize {
        schema::MIGRATIONS.len()
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock dropped its transaction (rolled back): the connection
        // is still sound.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` in one IMMEDIATE transaction and commits it.
    fn write<R>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let result = f(&tx)?;
        tx.commit()?;
        Ok(result)
    }

    // ------------------------------------------------------------------ peers

    /// Inserts or updates a peer. `first_seen_ms` keeps the earliest value, `last_seen_ms` the
    /// latest.
    pub fn upsert_peer(&self, peer: &PeerRecord) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO peers (fingerprint, name, organisation, trust, liveness, liveness_ms,
                     control_endpoint, first_seen_ms, last_seen_ms, pinned_spki)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (fingerprint) DO UPDATE SET
                     name = excluded.name, organisation = excluded.organisation,
                     trust = excluded.trust, liveness = excluded.liveness,
                     liveness_ms = excluded.liveness_ms,
                     control_endpoint = excluded.control_endpoint,
                     first_seen_ms = min(first_seen_ms, excluded.first_seen_ms),
                     last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),
                     pinned_spki = excluded.pinned_spki",
                params![
                    peer.fingerprint,
                    clip(&peer.name),
                    peer.organisation.as_deref().map(clip),
                    trust_str(peer.trust),
                    peer.liveness.as_str(),
                    peer.liveness_ms,
                    clip(&peer.control_endpoint),
                    peer.first_seen_ms,
                    peer.last_seen_ms,
                    peer.pinned_spki,
                ],
            )?;
            Ok(())
        })
    }

    pub fn peer(&self, fingerprint: &Fingerprint) -> Result<Option<PeerRecord>, StoreError> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                &format!("SELECT {PEER_COLUMNS} FROM peers WHERE fingerprint = ?1"),
                [fingerprint],
                peer_from_row,
            )
            .optional()?)
    }

    /// Every known peer, by name.
    pub fn peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT {PEER_COLUMNS} FROM peers ORDER BY name, fingerprint LIMIT {MAX_LIST}"
        ))?;
        let rows = stmt.query_map([], peer_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a liveness change; `false` if the peer is unknown. `last_seen_ms` moves to `at`
    /// when the peer is alive.
    pub fn set_liveness(
        &self,
        fingerprint: &Fingerprint,
        liveness: Liveness,
        at: UnixMs,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let changed = tx.execute(
                "UPDATE peers SET liveness = ?2, liveness_ms = ?3,
                     last_seen_ms = CASE WHEN ?2 = 'alive' THEN max(last_seen_ms, ?3)
                                         ELSE last_seen_ms END
                 WHERE fingerprint = ?1",
                params![fingerprint, liveness.as_str(), at],
            )?;
            Ok(changed == 1)
        })
    }

    // ------------------------------------------------------------------ policy rules

    /// Adds an operator rule; returns its id.
    pub fn add_policy_rule(&self, rule: &PolicyRule) -> Result<i64, StoreError> {
        let (fingerprint, organisation) = match &rule.subject {
            RuleSubject::Fingerprint(fp) => (Some(*fp), None),
            RuleSubject::Organisation(org) => (None, Some(clip(org))),
        };
        self.write(|tx| {
            tx.execute(
                "INSERT INTO policy_rules (action, fingerprint, organisation, note, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    rule.action.as_str(),
                    fingerprint,
                    organisation,
                    clip(&rule.note),
                    rule.created_ms
                ],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Removes a rule; `false` if there was none with that id.
    pub fn remove_policy_rule(&self, id: i64) -> Result<bool, StoreError> {
        self.write(|tx| Ok(tx.execute("DELETE FROM policy_rules WHERE id = ?1", [id])? == 1))
    }

    /// Every rule, oldest first.
    pub fn policy_rules(&self) -> Result<Vec<PolicyRule>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT id, action, fingerprint, organisation, note, created_ms FROM policy_rules
             ORDER BY id LIMIT {MAX_LIST}"
        ))?;
        let rows = stmt.query_map([], |row| {
            let fingerprint: Option<Fingerprint> = row.get(2)?;
            let organisation: Option<String> = row.get(3)?;
            let subject = match (fingerprint, organisation) {
                (Some(fp), _) => RuleSubject::Fingerprint(fp),
                (None, Some(org)) => RuleSubject::Organisation(org),
                (None, None) => return Err(corrupt(2, "a rule without a subject")),
            };
            Ok(PolicyRule {
                id: row.get(0)?,
                action: parse_text(row, 1)?,
                subject,
                note: row.get(4)?,
                created_ms: row.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ------------------------------------------------------------------ adverts

    /// Stores an advertisement if its sequence is higher than the stored one's (or there is
    /// none); returns whether it was stored.
    pub fn put_advert(
        &self,
        node_id: &Fingerprint,
        sequence: u64,
        signed: &[u8],
        received_ms: UnixMs,
        expires_ms: UnixMs,
    ) -> Result<bool, StoreError> {
        let sequence = to_i64("advert sequence", sequence)?;
        self.write(|tx| {
            let changed = tx.execute(
                "INSERT INTO adverts (node_id, sequence, signed, received_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (node_id) DO UPDATE SET
                     sequence = excluded.sequence, signed = excluded.signed,
                     received_ms = excluded.received_ms, expires_ms = excluded.expires_ms
                 WHERE excluded.sequence > adverts.sequence",
                params![node_id, sequence, signed, received_ms, expires_ms],
            )?;
            Ok(changed == 1)
        })
    }

    /// Every stored advertisement (expired ones too, until [`Store::delete_expired_adverts`]).
    pub fn adverts(&self) -> Result<Vec<AdvertRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT node_id, sequence, signed, received_ms, expires_ms FROM adverts
             ORDER BY node_id LIMIT {MAX_LIST}"
        ))?;
        let rows = stmt.query_map([], |row| {
            Ok(AdvertRecord {
                node_id: row.get(0)?,
                sequence: get_u64(row, 1)?,
                signed: row.get(2)?,
                received_ms: row.get(3)?,
                expires_ms: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes the advertisement of one node (dead peers); `false` if there was none.
    pub fn delete_advert(&self, node_id: &Fingerprint) -> Result<bool, StoreError> {
        self.write(|tx| Ok(tx.execute("DELETE FROM adverts WHERE node_id = ?1", [node_id])? == 1))
    }

    /// Removes advertisements that expired at or before `now`; returns how many.
    pub fn delete_expired_adverts(&self, now: UnixMs) -> Result<usize, StoreError> {
        self.write(|tx| Ok(tx.execute("DELETE FROM adverts WHERE expires_ms <= ?1", [now])?))
    }

    // ------------------------------------------------------------------ arrangements

    /// Inserts a new arrangement and its first history event, in one transaction.
    pub fn insert_arrangement(&self, record: &ArrangementRecord) -> Result<(), StoreError> {
        if record.id.is_empty() || record.id.chars().count() > 128 {
            return Err(StoreError::InvalidArrangement {
                id: clip(&record.id),
                reason: "an arrangement id is 1 to 128 characters".to_owned(),
            });
        }
        if record.state == State::Unspecified {
            return Err(StoreError::InvalidArrangement {
                id: record.id.clone(),
                reason: "state unspecified".to_owned(),
            });
        }
        let tunnel_sources = encode_strings(&record.tunnel_sources)?;
        self.write(|tx| {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM arrangements WHERE id = ?1)",
                [&record.id],
                |row| row.get(0),
            )?;
            if exists {
                return Err(StoreError::DuplicateArrangement(record.id.clone()));
            }
            tx.execute(
                "INSERT INTO arrangements (id, role, peer, state, request_id, offer_id,
                     agreement_id, peer_ref, terms, service, requirements, peer_endpoints,
                     tunnel_sources, created_ms, updated_ms, activated_ms, expires_ms, ended_ms,
                     end_reason, settlement)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                     ?17, ?18, ?19, ?20)",
                params![
                    record.id,
                    record.role.as_str(),
                    record.peer,
                    record.state,
                    clip(&record.request_id),
                    record.offer_id.as_deref().map(clip),
                    record.agreement_id.as_deref().map(clip),
                    record.peer_ref.as_deref().map(clip),
                    record.terms.as_ref().map(Message::encode_to_vec),
                    record.service.as_ref().map(Message::encode_to_vec),
                    record.requirements.as_ref().map(Message::encode_to_vec),
                    record.peer_endpoints.as_ref().map(Message::encode_to_vec),
                    tunnel_sources,
                    record.created_ms,
                    record.updated_ms,
                    record.activated_ms,
                    record.expires_ms,
                    record
                        .ended_ms
                        .or(is_terminal(record.state).then_some(record.created_ms)),
                    record.end_reason.as_deref().map(clip),
                    record.settlement.as_ref().map(Message::encode_to_vec),
                ],
            )?;
            append_event(
                tx,
                &record.id,
                None,
                record.state,
                record.created_ms,
                "created",
            )?;
            Ok(())
        })
    }

    /// Moves an arrangement to `to` in one transaction: checks that its current state is one of
    /// `allowed_from` (empty: any) and that the edge is legal, applies `changes`, and appends
    /// the history event. Returns the record as stored.
    pub fn transition(
        &self,
        id: &str,
        allowed_from: &[State],
        to: State,
        at: UnixMs,
        detail: &str,
        changes: ArrangementChanges,
    ) -> Result<ArrangementRecord, StoreError> {
        let tunnel_sources = changes
            .tunnel_sources
            .as_deref()
            .map(encode_strings)
            .transpose()?;
        self.write(|tx| {
            let current = read_arrangement(tx, id)?
                .ok_or_else(|| StoreError::UnknownArrangement(id.to_owned()))?;
            if !allowed_from.is_empty() && !allowed_from.contains(&current.state) {
                return Err(StoreError::UnexpectedState {
                    id: id.to_owned(),
                    current: current.state,
                    expected: allowed_from.to_vec(),
                });
            }
            if !legal_edge(current.state, to) {
                return Err(StoreError::IllegalTransition {
                    from: current.state,
                    to,
                });
            }
            let activated_ms = changes
                .activated_ms
                .or(current.activated_ms)
                .or((to == State::Active).then_some(at));
            let ended_ms = is_terminal(to).then_some(at);
            tx.execute(
                "UPDATE arrangements SET state = ?2, updated_ms = ?3,
                     offer_id = coalesce(?4, offer_id),
                     agreement_id = coalesce(?5, agreement_id),
                     peer_ref = coalesce(?6, peer_ref),
                     terms = coalesce(?7, terms),
                     service = coalesce(?8, service),
                     requirements = coalesce(?9, requirements),
                     peer_endpoints = coalesce(?10, peer_endpoints),
                     tunnel_sources = coalesce(?11, tunnel_sources),
                     activated_ms = ?12,
                     expires_ms = coalesce(?13, expires_ms),
                     ended_ms = coalesce(?14, ended_ms),
                     end_reason = coalesce(?15, end_reason),
                     settlement = coalesce(?16, settlement)
                 WHERE id = ?1",
                params![
                    id,
                    to,
                    at,
                    changes.offer_id.as_deref().map(clip),
                    changes.agreement_id.as_deref().map(clip),
                    changes.peer_ref.as_deref().map(clip),
                    changes.terms.as_ref().map(Message::encode_to_vec),
                    changes.service.as_ref().map(Message::encode_to_vec),
                    changes.requirements.as_ref().map(Message::encode_to_vec),
                    changes.peer_endpoints.as_ref().map(Message::encode_to_vec),
                    tunnel_sources,
                    activated_ms,
                    changes.expires_ms,
                    ended_ms,
                    changes.end_reason.as_deref().map(clip),
                    changes.settlement.as_ref().map(Message::encode_to_vec),
                ],
            )?;
            append_event(tx, id, Some(current.state), to, at, detail)?;
            read_arrangement(tx, id)?.ok_or_else(|| StoreError::UnknownArrangement(id.to_owned()))
        })
    }

    pub fn arrangement(&self, id: &str) -> Result<Option<ArrangementRecord>, StoreError> {
        let conn = self.lock();
        read_arrangement(&conn, id)
    }

    /// Arrangements matching `filter`, most recently created first.
    pub fn arrangements(
        &self,
        filter: &ArrangementFilter,
    ) -> Result<Vec<ArrangementRecord>, StoreError> {
        let mut sql = format!("SELECT {ARRANGEMENT_COLUMNS} FROM arrangements WHERE 1 = 1");
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        if let Some(role) = filter.role {
            args.push(Box::new(role.as_str()));
            sql.push_str(&format!(" AND role = ?{}", args.len()));
        }
        if let Some(peer) = filter.peer {
            args.push(Box::new(peer));
            sql.push_str(&format!(" AND peer = ?{}", args.len()));
        }
        if let Some(request_id) = &filter.request_id {
            args.push(Box::new(request_id.clone()));
            sql.push_str(&format!(" AND request_id = ?{}", args.len()));
        }
        if !filter.states.is_empty() {
            let list = filter
                .states
                .iter()
                .map(|s| (*s as i32).to_string())
                .collect::<Vec<_>>()
                .join(",");
            sql.push_str(&format!(" AND state IN ({list})"));
        }
        let limit = filter.limit.unwrap_or(MAX_LIST).min(MAX_LIST);
        sql.push_str(&format!(" ORDER BY created_ms DESC, id LIMIT {limit}"));
        let conn = self.lock();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(
            rusqlite::params_from_iter(args.iter()),
            arrangement_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The history of one arrangement, oldest first.
    pub fn events(&self, arrangement: &str) -> Result<Vec<ArrangementEvent>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT seq, arrangement, from_state, to_state, at_ms, detail FROM arrangement_events
             WHERE arrangement = ?1 ORDER BY seq LIMIT {MAX_LIST}"
        ))?;
        let rows = stmt.query_map([arrangement], |row| {
            Ok(ArrangementEvent {
                seq: row.get(0)?,
                arrangement: row.get(1)?,
                from: row.get(2)?,
                to: row.get(3)?,
                at_ms: row.get(4)?,
                detail: row.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many arrangements are in each state (for the metrics gauges).
    pub fn arrangement_counts(&self) -> Result<Vec<(State, u64)>, StoreError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT state, count(*) FROM arrangements GROUP BY state ORDER BY state")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, get_u64(row, 1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ------------------------------------------------------------------ usage ledger

    /// Appends a usage entry; returns its ledger sequence number.
    pub fn record_usage(&self, entry: &UsageEntry) -> Result<i64, StoreError> {
        let connections = to_i64("connections", entry.connections)?;
        let bytes = to_i64("bytes", entry.bytes)?;
        let packets = to_i64("packets", entry.packets)?;
        self.write(|tx| {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM arrangements WHERE id = ?1)",
                [&entry.arrangement],
                |row| row.get(0),
            )?;
            if !exists {
                return Err(StoreError::UnknownArrangement(entry.arrangement.clone()));
            }
            tx.execute(
                "INSERT INTO usage_ledger (arrangement, at_ms, source, kind, connections, bytes,
                     packets)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    entry.arrangement,
                    entry.at_ms,
                    entry.source.as_str(),
                    entry.kind.as_str(),
                    connections,
                    bytes,
                    packets
                ],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// The latest counts of each side, `(local, peer)`. Entries are cumulative, so the latest
    /// one is the total so far; a side that never reported has zero counts.
    pub fn usage_totals(
        &self,
        arrangement: &str,
    ) -> Result<(UsageCounts, UsageCounts), StoreError> {
        let conn = self.lock();
        let latest = |source: UsageSource| -> Result<UsageCounts, StoreError> {
            Ok(conn
                .query_row(
                    "SELECT connections, bytes, packets, at_ms, kind FROM usage_ledger
                     WHERE arrangement = ?1 AND source = ?2 ORDER BY seq DESC LIMIT 1",
                    params![arrangement, source.as_str()],
                    |row| {
                        let kind: UsageKind = parse_text(row, 4)?;
                        Ok(UsageCounts {
                            connections: get_u64(row, 0)?,
                            bytes: get_u64(row, 1)?,
                            packets: get_u64(row, 2)?,
                            at_ms: row.get(3)?,
                            is_final: kind == UsageKind::Final,
                        })
                    },
                )
                .optional()?
                .unwrap_or_default())
        };
        Ok((latest(UsageSource::Local)?, latest(UsageSource::Peer)?))
    }

    /// The ledger lines of one arrangement, oldest first.
    pub fn usage(&self, arrangement: &str) -> Result<Vec<UsageEntry>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT arrangement, at_ms, source, kind, connections, bytes, packets
             FROM usage_ledger WHERE arrangement = ?1 ORDER BY seq LIMIT {MAX_LIST}"
        ))?;
        let rows = stmt.query_map([arrangement], |row| {
            Ok(UsageEntry {
                arrangement: row.get(0)?,
                at_ms: row.get(1)?,
                source: parse_text(row, 2)?,
                kind: parse_text(row, 3)?,
                connections: get_u64(row, 4)?,
                bytes: get_u64(row, 5)?,
                packets: get_u64(row, 6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ------------------------------------------------------------------ negotiations

    /// Records the start of a negotiation (state `running`).
    pub fn begin_negotiation(
        &self,
        requirements: &pb::ServiceRequirements,
        started_ms: UnixMs,
    ) -> Result<(), StoreError> {
        let service = requirements
            .service
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        self.write(|tx| {
            let changed = tx.execute(
                "INSERT INTO negotiations (request_id, service, requirements, state, started_ms)
                 VALUES (?1, ?2, ?3, 'running', ?4) ON CONFLICT (request_id) DO NOTHING",
                params![
                    clip(&requirements.request_id),
                    clip(&service),
                    requirements.encode_to_vec(),
                    started_ms
                ],
            )?;
            if changed == 0 {
                return Err(StoreError::DuplicateNegotiation(
                    requirements.request_id.clone(),
                ));
            }
            Ok(())
        })
    }

    /// Ends a running negotiation with its outcome.
    pub fn finish_negotiation(
        &self,
        request_id: &str,
        outcome: NegotiationState,
        covered_conn_per_s: u64,
        detail: &str,
        at: UnixMs,
    ) -> Result<NegotiationRecord, StoreError> {
        if outcome == NegotiationState::Running {
            return Err(StoreError::NotAnOutcome(request_id.to_owned()));
        }
        let covered = to_i64("covered connections/s", covered_conn_per_s)?;
        self.write(|tx| {
            let current = read_negotiation(tx, request_id)?
                .ok_or_else(|| StoreError::UnknownNegotiation(request_id.to_owned()))?;
            if current.state != NegotiationState::Running {
                return Err(StoreError::NegotiationEnded {
                    request_id: request_id.to_owned(),
                    state: current.state,
                });
            }
            tx.execute(
                "UPDATE negotiations SET state = ?2, ended_ms = ?3, covered_conn_per_s = ?4,
                     detail = ?5 WHERE request_id = ?1",
                params![request_id, outcome.as_str(), at, covered, clip(detail)],
            )?;
            read_negotiation(tx, request_id)?
                .ok_or_else(|| StoreError::UnknownNegotiation(request_id.to_owned()))
        })
    }

    pub fn negotiation(&self, request_id: &str) -> Result<Option<NegotiationRecord>, StoreError> {
        let conn = self.lock();
        read_negotiation(&conn, request_id)
    }

    /// The latest `limit` negotiations (at most [`MAX_LIST`]), newest first.
    pub fn negotiations(&self, limit: usize) -> Result<Vec<NegotiationRecord>, StoreError> {
        self.list_negotiations("1 = 1", limit)
    }

    /// Negotiations still `running` (after a restart: interrupted ones), oldest first.
    pub fn unfinished_negotiations(&self) -> Result<Vec<NegotiationRecord>, StoreError> {
        let mut list = self.list_negotiations("state = 'running'", MAX_LIST)?;
        list.reverse();
        Ok(list)
    }

    fn list_negotiations(
        &self,
        condition: &str,
        limit: usize,
    ) -> Result<Vec<NegotiationRecord>, StoreError> {
        let limit = limit.min(MAX_LIST);
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT {NEGOTIATION_COLUMNS} FROM negotiations WHERE {condition}
             ORDER BY started_ms DESC, request_id LIMIT {limit}"
        ))?;
        let rows = stmt.query_map([], negotiation_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ------------------------------------------------------------------ reputation

    /// Stores a reputation statement if its sequence is higher than the stored one of the same
    /// (subject, reporter); returns whether it was stored.
    pub fn put_reputation(&self, report: &ReputationRecord) -> Result<bool, StoreError> {
        let sequence = to_i64("reputation sequence", report.sequence)?;
        let samples = to_i64("samples", report.samples)?;
        let mismatches = to_i64("mismatches", report.mismatches)?;
        let unanswered = to_i64("unanswered", report.unanswered)?;
        self.write(|tx| {
            let changed = tx.execute(
                "INSERT INTO reputation (subject, reporter, sequence, score_ppm, samples,
                     mismatches, unanswered, window_end_ms, received_ms, signed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (subject, reporter) DO UPDATE SET
                     sequence = excluded.sequence, score_ppm = excluded.score_ppm,
                     samples = excluded.samples, mismatches = excluded.mismatches,
                     unanswered = excluded.unanswered, window_end_ms = excluded.window_end_ms,
                     received_ms = excluded.received_ms, signed = excluded.signed
                 WHERE excluded.sequence > reputation.sequence",
                params![
                    report.subject,
                    report.reporter,
                    sequence,
                    report.score_ppm,
                    samples,
                    mismatches,
                    unanswered,
                    report.window_end_ms,
                    report.received_ms,
                    report.signed,
                ],
            )?;
            Ok(changed == 1)
        })
    }

    /// Every reporter's latest statement about `subject`.
    pub fn reputation_of(
        &self,
        subject: &Fingerprint,
    ) -> Result<Vec<ReputationRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!(
            "SELECT subject, reporter, sequence, score_ppm, samples, mismatches, unanswered,
                 window_end_ms, received_ms, signed
             FROM reputation WHERE subject = ?1 ORDER BY reporter LIMIT {MAX_LIST}"
        ))?;
        let rows = stmt.query_map([subject], |row| {
            Ok(ReputationRecord {
                subject: row.get(0)?,
                reporter: row.get(1)?,
                sequence: get_u64(row, 2)?,
                score_ppm: row.get(3)?,
                samples: get_u64(row, 4)?,
                mismatches: get_u64(row, 5)?,
                unanswered: get_u64(row, 6)?,
                window_end_ms: row.get(7)?,
                received_ms: row.get(8)?,
                signed: row.get(9)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ------------------------------------------------------------------ maintenance

    /// Checks the file and the invariants the store keeps: SQLite's integrity and foreign-key
    /// checks, every arrangement's state equals the target of its last event, each event
    /// starts where the previous one ended and is a legal edge, terminal arrangements have an
    /// end time. Run at start (cheap at the store's sizes).
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let conn = self.lock();
        let integrity: String = conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
        if integrity != "ok" {
            return Err(StoreError::Inconsistent(format!(
                "integrity check: {integrity}"
            )));
        }
        let fk_violations: i64 =
            conn.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |row| {
                row.get(0)
            })?;
        if fk_violations > 0 {
            return Err(StoreError::Inconsistent(format!(
                "{fk_violations} foreign key violations"
            )));
        }
        let mut report = VerifyReport::default();
        let mut stmt = conn.prepare(
            "SELECT a.id, a.state, a.ended_ms, e.from_state, e.to_state
             FROM arrangements a LEFT JOIN arrangement_events e ON e.arrangement = a.id
             ORDER BY a.id, e.seq",
        )?;
        type EventRow = (String, State, Option<UnixMs>, Option<State>, Option<State>);
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })?;
        let mut current: Option<(String, State, Option<UnixMs>, Option<State>)> = None;
        let finish = |c: &Option<(String, State, Option<UnixMs>, Option<State>)>| match c {
            None => Ok(()),
            Some((id, state, ended, last)) => {
                if *last != Some(*state) {
                    return Err(StoreError::Inconsistent(format!(
                        "arrangement {id} is {} but its last event leads to {}",
                        state_name(*state),
                        last.map_or("nothing", state_name)
                    )));
                }
                if is_terminal(*state) && ended.is_none() {
                    return Err(StoreError::Inconsistent(format!(
                        "arrangement {id} is {} without an end time",
                        state_name(*state)
                    )));
                }
                Ok(())
            }
        };
        for row in rows {
            let (id, state, ended, from, to): EventRow = row?;
            if current.as_ref().is_none_or(|c| c.0 != id) {
                finish(&current)?;
                report.arrangements += 1;
                if let Some(to) = to {
                    report.events += 1;
                    if from.is_some() {
                        return Err(StoreError::Inconsistent(format!(
                            "arrangement {id}: its first event is not a creation"
                        )));
                    }
                    current = Some((id, state, ended, Some(to)));
                } else {
                    current = Some((id, state, ended, None));
                }
                continue;
            }
            let Some(c) = current.as_mut() else { continue };
            let Some(to) = to else { continue };
            report.events += 1;
            match (from, c.3) {
                (Some(from), Some(previous)) if from == previous && legal_edge(from, to) => {}
                _ => {
                    return Err(StoreError::Inconsistent(format!(
                        "arrangement {id}: event {} -> {} does not follow {}",
                        from.map_or("nothing", state_name),
                        state_name(to),
                        c.3.map_or("nothing", state_name)
                    )));
                }
            }
            c.3 = Some(to);
        }
        finish(&current)?;
        drop(stmt);
        let ledger_entries: i64 =
            conn.query_row("SELECT count(*) FROM usage_ledger", [], |row| row.get(0))?;
        report.ledger_entries = usize::try_from(ledger_entries).unwrap_or(usize::MAX);
        Ok(report)
    }

    /// Writes a consistent copy of the database to `dest` (`VACUUM INTO`), while the store
    /// stays in use. Refuses to overwrite.
    pub fn backup_to(&self, dest: &Path) -> Result<(), StoreError> {
        if dest.exists() {
            return Err(StoreError::BackupExists(dest.to_owned()));
        }
        let conn = self.lock();
        conn.execute("VACUUM INTO ?1", [dest.to_string_lossy()])?;
        Ok(())
    }
}

// ---------------------------------------------------------------------- migrations

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let known = schema::MIGRATIONS.len();
    if version < 0 || usize::try_from(version).map_or(true, |v| v > known) {
        return Err(StoreError::SchemaTooNew {
            found: version,
            known,
        });
    }
    let applied = usize::try_from(version).unwrap_or(known);
    for (index, step) in schema::MIGRATIONS.iter().enumerate().skip(applied) {
        let target = index + 1;
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
            tx.execute_batch(step)?;
            tx.pragma_update(
                None,
                "user_version",
                i64::try_from(target).unwrap_or(i64::MAX),
            )?;
            tx.commit()
        };
        run(conn).map_err(|source| StoreError::Migration {
            version: target,
            source,
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------- rows

const PEER_COLUMNS: &str = "fingerprint, name, organisation, trust, liveness, liveness_ms, \
                            control_endpoint, first_seen_ms, last_seen_ms, pinned_spki";

fn peer_from_row(row: &Row<'_>) -> rusqlite::Result<PeerRecord> {
    let trust: String = row.get(3)?;
    Ok(PeerRecord {
        fingerprint: row.get(0)?,
        name: row.get(1)?,
        organisation: row.get(2)?,
        trust: parse_trust(&trust).ok_or_else(|| corrupt(3, "unknown trust level"))?,
        liveness: parse_text(row, 4)?,
        liveness_ms: row.get(5)?,
        control_endpoint: row.get(6)?,
        first_seen_ms: row.get(7)?,
        last_seen_ms: row.get(8)?,
        pinned_spki: row.get(9)?,
    })
}

const ARRANGEMENT_COLUMNS: &str = "id, role, peer, state, request_id, offer_id, agreement_id, \
     peer_ref, terms, service, requirements, peer_endpoints, tunnel_sources, created_ms, \
     updated_ms, activated_ms, expires_ms, ended_ms, end_reason, settlement";

fn read_arrangement(conn: &Connection, id: &str) -> Result<Option<ArrangementRecord>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {ARRANGEMENT_COLUMNS} FROM arrangements WHERE id = ?1"),
            [id],
            arrangement_from_row,
        )
        .optional()?)
}

fn arrangement_from_row(row: &Row<'_>) -> rusqlite::Result<ArrangementRecord> {
    let role: String = row.get(1)?;
    let tunnel_sources: String = row.get(12)?;
    Ok(ArrangementRecord {
        id: row.get(0)?,
        role: role.parse().map_err(|_| corrupt(1, "unknown role"))?,
        peer: row.get(2)?,
        state: row.get(3)?,
        request_id: row.get(4)?,
        offer_id: row.get(5)?,
        agreement_id: row.get(6)?,
        peer_ref: row.get(7)?,
        terms: decode(row, 8)?,
        service: decode(row, 9)?,
        requirements: decode(row, 10)?,
        peer_endpoints: decode(row, 11)?,
        tunnel_sources: serde_json::from_str(&tunnel_sources)
            .map_err(|_| corrupt(12, "tunnel sources are not a list of strings"))?,
        created_ms: row.get(13)?,
        updated_ms: row.get(14)?,
        activated_ms: row.get(15)?,
        expires_ms: row.get(16)?,
        ended_ms: row.get(17)?,
        end_reason: row.get(18)?,
        settlement: decode(row, 19)?,
    })
}

const NEGOTIATION_COLUMNS: &str =
    "request_id, service, requirements, state, started_ms, ended_ms, covered_conn_per_s, detail";

fn read_negotiation(
    conn: &Connection,
    request_id: &str,
) -> Result<Option<NegotiationRecord>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {NEGOTIATION_COLUMNS} FROM negotiations WHERE request_id = ?1"),
            [request_id],
            negotiation_from_row,
        )
        .optional()?)
}

fn negotiation_from_row(row: &Row<'_>) -> rusqlite::Result<NegotiationRecord> {
    Ok(NegotiationRecord {
        request_id: row.get(0)?,
        service: row.get(1)?,
        requirements: decode(row, 2)?,
        state: parse_text(row, 3)?,
        started_ms: row.get(4)?,
        ended_ms: row.get(5)?,
        covered_conn_per_s: get_u64(row, 6)?,
        detail: row.get(7)?,
    })
}

fn append_event(
    tx: &Transaction<'_>,
    arrangement: &str,
    from: Option<State>,
    to: State,
    at: UnixMs,
    detail: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO arrangement_events (arrangement, from_state, to_state, at_ms, detail)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![arrangement, from, to, at, clip(detail)],
    )?;
    Ok(())
}

fn decode<M: Message + Default>(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<M>> {
    let bytes: Option<Vec<u8>> = row.get(index)?;
    bytes
        .map(|b| M::decode(b.as_slice()).map_err(|_| corrupt(index, "undecodable protobuf")))
        .transpose()
}

fn parse_text<T: FromStr<Err = String>>(row: &Row<'_>, index: usize) -> rusqlite::Result<T> {
    let text: String = row.get(index)?;
    text.parse().map_err(|e: String| corrupt_owned(index, e))
}

fn corrupt(index: usize, reason: &'static str) -> rusqlite::Error {
    corrupt_owned(index, reason.to_owned())
}

fn corrupt_owned(index: usize, reason: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, reason.into())
}

fn encode_strings(list: &[String]) -> Result<String, StoreError> {
    let list: Vec<String> = list.iter().take(256).map(|s| clip(s)).collect();
    serde_json::to_string(&list).map_err(|e| StoreError::Inconsistent(e.to_string()))
}

fn get_u64(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(index)?;
    u64::try_from(value).map_err(|_| corrupt(index, "negative count"))
}

fn to_i64(field: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { field, value })
}

fn clip(text: &str) -> String {
    text.chars().take(MAX_TEXT_CHARS).collect()
}

fn trust_str(trust: TrustLevel) -> &'static str {
    trust.as_str()
}

fn parse_trust(text: &str) -> Option<TrustLevel> {
    [
        TrustLevel::FirstContact,
        TrustLevel::Allowed,
        TrustLevel::LongTerm,
    ]
    .into_iter()
    .find(|t| t.as_str() == text)
}

// ---------------------------------------------------------------------- SQL conversions

impl rusqlite::ToSql for Fingerprint {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.to_string()))
    }
}

impl FromSql for Fingerprint {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        text.parse().map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

impl rusqlite::ToSql for State {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(*self as i32))
    }
}

impl FromSql for State {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let raw = value.as_i64()?;
        i32::try_from(raw)
            .ok()
            .and_then(|v| State::try_from(v).ok())
            .filter(|s| *s != State::Unspecified)
            .ok_or(FromSqlError::OutOfRange(raw))
    }
}
