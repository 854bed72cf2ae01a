//! The store's schema as an ordered list of migrations.
//!
//! `PRAGMA user_version` holds how many steps a database has applied. Steps are append-only:
//! a released step is never edited, a change is a new step at the end. Each step runs in one
//! transaction together with the `user_version` bump, so a crash leaves either the old or the
//! new schema, never half of one.

/// Migration steps, applied in order; step `n` (0-based) moves `user_version` from `n` to `n + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r"
CREATE TABLE peers (
    fingerprint      TEXT PRIMARY KEY CHECK (length(fingerprint) = 64),
    name             TEXT NOT NULL,
    organisation     TEXT,
    trust            TEXT NOT NULL CHECK (trust IN ('first-contact', 'allowed', 'long-term')),
    liveness         TEXT NOT NULL CHECK (liveness IN ('alive', 'suspect', 'dead')),
    liveness_ms      INTEGER NOT NULL,
    control_endpoint TEXT NOT NULL,
    first_seen_ms    INTEGER NOT NULL,
    last_seen_ms     INTEGER NOT NULL,
    pinned_spki      BLOB NOT NULL
) STRICT;

CREATE TABLE policy_rules (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    action       TEXT NOT NULL CHECK (action IN ('allow', 'deny')),
    fingerprint  TEXT CHECK (fingerprint IS NULL OR length(fingerprint) = 64),
    organisation TEXT,
    note         TEXT NOT NULL DEFAULT '',
    created_ms   INTEGER NOT NULL,
    CHECK ((fingerprint IS NULL) <> (organisation IS NULL))
) STRICT;

CREATE TABLE adverts (
    node_id     TEXT PRIMARY KEY CHECK (length(node_id) = 64),
    sequence    INTEGER NOT NULL CHECK (sequence >= 0),
    signed      BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL
) STRICT;
CREATE INDEX adverts_expiry ON adverts (expires_ms);

CREATE TABLE arrangements (
    id             TEXT PRIMARY KEY,
    role           TEXT NOT NULL CHECK (role IN ('primary', 'provider')),
    peer           TEXT NOT NULL CHECK (length(peer) = 64),
    state          INTEGER NOT NULL CHECK (state BETWEEN 1 AND 7),
    request_id     TEXT NOT NULL,
    offer_id       TEXT,
    agreement_id   TEXT,
    peer_ref       TEXT,
    terms          BLOB,
    service        BLOB,
    requirements   BLOB,
    peer_endpoints BLOB,
    tunnel_sources TEXT NOT NULL DEFAULT '[]',
    created_ms     INTEGER NOT NULL,
    updated_ms     INTEGER NOT NULL,
    activated_ms   INTEGER,
    expires_ms     INTEGER,
    ended_ms       INTEGER,
    end_reason     TEXT,
    settlement     BLOB
) STRICT;
CREATE INDEX arrangements_state ON arrangements (state);
CREATE INDEX arrangements_peer ON arrangements (peer);
CREATE INDEX arrangements_request ON arrangements (request_id);

CREATE TABLE arrangement_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    arrangement TEXT NOT NULL REFERENCES arrangements (id),
    from_state  INTEGER CHECK (from_state IS NULL OR from_state BETWEEN 1 AND 7),
    to_state    INTEGER NOT NULL CHECK (to_state BETWEEN 1 AND 7),
    at_ms       INTEGER NOT NULL,
    detail      TEXT NOT NULL
) STRICT;
CREATE INDEX arrangement_events_arrangement ON arrangement_events (arrangement, seq);
CREATE TRIGGER arrangement_events_no_update BEFORE UPDATE ON arrangement_events
BEGIN SELECT RAISE(ABORT, 'arrangement_events is append-only'); END;
CREATE TRIGGER arrangement_events_no_delete BEFORE DELETE ON arrangement_events
BEGIN SELECT RAISE(ABORT, 'arrangement_events is append-only'); END;

CREATE TABLE usage_ledger (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    arrangement TEXT NOT NULL REFERENCES arrangements (id),
    at_ms       INTEGER NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('local', 'peer')),
    kind        TEXT NOT NULL CHECK (kind IN ('heartbeat', 'final')),
    connections INTEGER NOT NULL CHECK (connections >= 0),
    bytes       INTEGER NOT NULL CHECK (bytes >= 0),
    packets     INTEGER NOT NULL CHECK (packets >= 0)
) STRICT;
CREATE INDEX usage_ledger_arrangement ON usage_ledger (arrangement, source, seq);
CREATE TRIGGER usage_ledger_no_update BEFORE UPDATE ON usage_ledger
BEGIN SELECT RAISE(ABORT, 'usage_ledger is append-only'); END;
CREATE TRIGGER usage_ledger_no_delete BEFORE DELETE ON usage_ledger
BEGIN SELECT RAISE(ABORT, 'usage_ledger is append-only'); END;

CREATE TABLE negotiations (
    request_id         TEXT PRIMARY KEY,
    service            TEXT NOT NULL,
    requirements       BLOB,
    state              TEXT NOT NULL
        CHECK (state IN ('running', 'succeeded', 'partial', 'failed', 'abandoned')),
    started_ms         INTEGER NOT NULL,
    ended_ms           INTEGER,
    covered_conn_per_s INTEGER NOT NULL DEFAULT 0 CHECK (covered_conn_per_s >= 0),
    detail             TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX negotiations_state ON negotiations (state);

CREATE TABLE reputation (
    subject       TEXT NOT NULL CHECK (length(subject) = 64),
    reporter      TEXT NOT NULL CHECK (length(reporter) = 64),
    sequence      INTEGER NOT NULL CHECK (sequence >= 0),
    score_ppm     INTEGER NOT NULL CHECK (score_ppm BETWEEN 0 AND 1000000),
    samples       INTEGER NOT NULL CHECK (samples >= 0),
    mismatches    INTEGER NOT NULL CHECK (mismatches >= 0),
    unanswered    INTEGER NOT NULL CHECK (unanswered >= 0),
    window_end_ms INTEGER NOT NULL,
    received_ms   INTEGER NOT NULL,
    signed        BLOB NOT NULL,
    PRIMARY KEY (subject, reporter)
) STRICT;
",
];
