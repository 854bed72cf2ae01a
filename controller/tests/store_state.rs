//! Store behaviour: schema migrations, the arrangement state machine, append-only history,
//! and the small tables.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::{path::Path, thread};

use p2pcdn_controller::{
    model::{Fingerprint, Role, TrustLevel},
    proto::pb,
    store::{
        ArrangementChanges, ArrangementFilter, ArrangementRecord, Liveness, NegotiationState,
        PeerRecord, PolicyRule, ReputationRecord, RuleAction, RuleSubject, State, Store,
        StoreError, UsageEntry, UsageKind, UsageSource, legal_edge,
    },
};

fn fp(byte: u8) -> Fingerprint {
    Fingerprint([byte; 32])
}

fn offer(id: &str, per_gb: u64) -> pb::Offer {
    pb::Offer {
        offer_id: id.to_owned(),
        request_id: "req-1".to_owned(),
        provider: vec![2; 32],
        granted: Some(pb::Capacity {
            new_connections_per_s: 500,
            egress_mbps: 1000,
            storage_bytes: 0,
        }),
        price: Some(pb::Price {
            per_gb_micros: per_gb,
            per_1000_connections_micros: 20,
            currency: "EUR".to_owned(),
        }),
        expires_at_ms: 5_000,
        mode: pb::RedirectionMode::DsrGue as i32,
        duration_s: 600,
        ..Default::default()
    }
}

fn raw(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

const STATES: [State; 7] = [
    State::Requested,
    State::Offered,
    State::Accepted,
    State::Active,
    State::Disbanding,
    State::Disbanded,
    State::Cancelled,
];

#[test]
fn migrates_an_empty_file_and_reopens_with_data_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/p2pcdn.db");
    {
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.schema_version().unwrap(),
            i64::try_from(Store::latest_schema_version()).unwrap()
        );
        let mut rec =
            ArrangementRecord::new("a1", Role::Primary, fp(2), State::Requested, "req-1", 1_000);
        rec.tunnel_sources = vec!["192.0.2.1".to_owned()];
        store.insert_arrangement(&rec).unwrap();
        store
            .transition(
                "a1",
                &[State::Requested],
                State::Offered,
                1_100,
                "offer",
                ArrangementChanges {
                    terms: Some(offer("o1", 10)),
                    offer_id: Some("o1".to_owned()),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    // The file is in WAL mode with foreign keys enforced by every store connection.
    let mode: String = raw(&path)
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");

    let store = Store::open(&path).unwrap();
    assert_eq!(
        store.schema_version().unwrap(),
        i64::try_from(Store::latest_schema_version()).unwrap()
    );
    let rec = store.arrangement("a1").unwrap().unwrap();
    assert_eq!(rec.state, State::Offered);
    assert_eq!(rec.terms, Some(offer("o1", 10)));
    assert_eq!(rec.tunnel_sources, vec!["192.0.2.1".to_owned()]);
    assert_eq!(store.events("a1").unwrap().len(), 2);
    store.verify().unwrap();
}

#[test]
fn a_schema_newer_than_the_build_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p2pcdn.db");
    drop(Store::open(&path).unwrap());
    raw(&path).pragma_update(None, "user_version", 999).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("999") && !text.contains('\n'), "{text}");
}

#[test]
fn a_file_that_is_not_a_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p2pcdn.db");
    std::fs::write(&path, vec![b'x'; 8192]).unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(err.to_string().contains("p2pcdn.db"), "{err}");
}

#[test]
fn full_lifecycle_records_every_step() {
    let store = Store::open_in_memory().unwrap();
    let rec = ArrangementRecord::new("a1", Role::Primary, fp(2), State::Requested, "req-1", 1_000);
    store.insert_arrangement(&rec).unwrap();
    let steps = [
        (State::Offered, "offer o1"),
        (State::Offered, "counter-offer o2"),
        (State::Accepted, "accepted"),
        (State::Active, "activated"),
        (State::Disbanding, "crowd over"),
        (State::Disbanded, "settled"),
    ];
    let mut at: i64 = 1_000;
    for (to, detail) in steps {
        at += 100;
        let changes = match to {
            State::Offered => ArrangementChanges {
                terms: Some(offer(detail, at.unsigned_abs())),
                ..Default::default()
            },
            State::Active => ArrangementChanges {
                expires_ms: Some(at + 600_000),
                ..Default::default()
            },
            State::Disbanded => ArrangementChanges {
                end_reason: Some("crowd-over".to_owned()),
                settlement: Some(pb::Settlement {
                    charges_micros: 100,
                    credit_micros: 10,
                    total_micros: 90,
                    currency: "EUR".to_owned(),
                }),
                ..Default::default()
            },
            _ => ArrangementChanges::default(),
        };
        let after = store
            .transition("a1", &[], to, at, detail, changes)
            .unwrap();
        assert_eq!(after.state, to);
        assert_eq!(after.updated_ms, at);
    }
    let rec = store.arrangement("a1").unwrap().unwrap();
    assert_eq!(rec.state, State::Disbanded);
    // The counter-offer replaced the terms; activation and end times were filled in.
    assert_eq!(rec.terms.unwrap().offer_id, "counter-offer o2");
    assert_eq!(rec.activated_ms, Some(1_400));
    assert_eq!(rec.expires_ms, Some(1_400 + 600_000));
    assert_eq!(rec.ended_ms, Some(1_600));
    assert_eq!(rec.end_reason.as_deref(), Some("crowd-over"));
    assert_eq!(rec.settlement.unwrap().total_micros, 90);

    let events = store.events("a1").unwrap();
    let path: Vec<(Option<State>, State)> = events.iter().map(|e| (e.from, e.to)).collect();
    assert_eq!(
        path,
        vec![
            (None, State::Requested),
            (Some(State::Requested), State::Offered),
            (Some(State::Offered), State::Offered),
            (Some(State::Offered), State::Accepted),
            (Some(State::Accepted), State::Active),
            (Some(State::Active), State::Disbanding),
            (Some(State::Disbanding), State::Disbanded),
        ]
    );
    assert_eq!(events[3].detail, "accepted");
    assert_eq!(store.verify().unwrap().events, 7);
}

#[test]
fn the_state_machine_is_exactly_the_documented_one() {
    use pb::ArrangementState::*;
    let documented = [
        (Requested, Offered),
        (Requested, Cancelled),
        (Offered, Offered),
        (Offered, Accepted),
        (Offered, Cancelled),
        (Accepted, Active),
        (Accepted, Cancelled),
        (Active, Disbanding),
        (Active, Disbanded),
        (Disbanding, Disbanded),
    ];
    let store = Store::open_in_memory().unwrap();
    let mut n = 0;
    for from in STATES {
        for to in STATES {
            n += 1;
            let id = format!("a{n}");
            let rec = ArrangementRecord::new(&id, Role::Provider, fp(3), from, "req", 10);
            store.insert_arrangement(&rec).unwrap();
            let result =
                store.transition(&id, &[from], to, 20, "try", ArrangementChanges::default());
            let legal = documented.contains(&(from, to));
            assert_eq!(legal_edge(from, to), legal, "{from:?} -> {to:?}");
            match result {
                Ok(after) => {
                    assert!(legal, "{from:?} -> {to:?} was allowed");
                    assert_eq!(after.state, to);
                }
                Err(StoreError::IllegalTransition { from: f, to: t }) => {
                    assert!(!legal, "{from:?} -> {to:?} was refused");
                    assert_eq!((f, t), (from, to));
                    // Nothing changed: same state, only the creation event.
                    assert_eq!(store.arrangement(&id).unwrap().unwrap().state, from);
                    assert_eq!(store.events(&id).unwrap().len(), 1);
                }
                Err(other) => panic!("{from:?} -> {to:?}: {other}"),
            }
        }
    }
    store.verify().unwrap();
}

#[test]
fn a_transition_from_an_unexpected_state_is_refused_and_changes_nothing() {
    let store = Store::open_in_memory().unwrap();
    store
        .insert_arrangement(&ArrangementRecord::new(
            "a1",
            Role::Primary,
            fp(2),
            State::Active,
            "r",
            10,
        ))
        .unwrap();
    // The caller thinks the arrangement is still Accepted: Active -> Cancelled would be
    // illegal anyway, but the precondition is checked first and reported as such.
    let err = store
        .transition(
            "a1",
            &[State::Offered, State::Accepted],
            State::Cancelled,
            20,
            "x",
            ArrangementChanges {
                end_reason: Some("nope".to_owned()),
                ..Default::default()
            },
        )
        .unwrap_err();
    match &err {
        StoreError::UnexpectedState {
            current, expected, ..
        } => {
            assert_eq!(*current, State::Active);
            assert_eq!(expected, &vec![State::Offered, State::Accepted]);
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        err.to_string(),
        "arrangement a1: state is active, expected one of offered|accepted"
    );
    let rec = store.arrangement("a1").unwrap().unwrap();
    assert_eq!(rec.state, State::Active);
    assert_eq!(rec.end_reason, None);
    assert!(matches!(
        store.transition(
            "nope",
            &[],
            State::Active,
            1,
            "",
            ArrangementChanges::default()
        ),
        Err(StoreError::UnknownArrangement(_))
    ));
    assert!(matches!(
        store.insert_arrangement(&ArrangementRecord::new(
            "a1",
            Role::Primary,
            fp(2),
            State::Requested,
            "r",
            10
        )),
        Err(StoreError::DuplicateArrangement(_))
    ));
}

#[test]
fn history_and_ledger_are_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p2pcdn.db");
    let store = Store::open(&path).unwrap();
    store
        .insert_arrangement(&ArrangementRecord::new(
            "a1",
            Role::Primary,
            fp(2),
            State::Active,
            "r",
            10,
        ))
        .unwrap();
    for (at, source, kind, conns) in [
        (100, UsageSource::Local, UsageKind::Heartbeat, 10),
        (110, UsageSource::Peer, UsageKind::Heartbeat, 9),
        (200, UsageSource::Local, UsageKind::Heartbeat, 25),
        (300, UsageSource::Local, UsageKind::Final, 30),
    ] {
        store
            .record_usage(&UsageEntry {
                arrangement: "a1".to_owned(),
                at_ms: at,
                source,
                kind,
                connections: conns,
                bytes: conns * 1000,
                packets: conns * 10,
            })
            .unwrap();
    }
    let (local, peer) = store.usage_totals("a1").unwrap();
    assert_eq!(
        (local.connections, local.bytes, local.at_ms, local.is_final),
        (30, 30_000, 300, true)
    );
    assert_eq!(
        (peer.connections, peer.packets, peer.is_final),
        (9, 90, false)
    );
    assert_eq!(store.usage("a1").unwrap().len(), 4);

    let conn = raw(&path);
    for sql in [
        "UPDATE usage_ledger SET connections = 0",
        "DELETE FROM usage_ledger",
        "UPDATE arrangement_events SET to_state = 6",
        "DELETE FROM arrangement_events",
    ] {
        let err = conn.execute(sql, []).unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(store.usage_totals("a1").unwrap().0.connections, 30);

    let err = store
        .record_usage(&UsageEntry {
            arrangement: "ghost".to_owned(),
            at_ms: 1,
            source: UsageSource::Local,
            kind: UsageKind::Heartbeat,
            connections: 1,
            bytes: 1,
            packets: 1,
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownArrangement(_)), "{err}");
    let err = store
        .record_usage(&UsageEntry {
            arrangement: "a1".to_owned(),
            at_ms: 1,
            source: UsageSource::Local,
            kind: UsageKind::Heartbeat,
            connections: u64::MAX,
            bytes: 1,
            packets: 1,
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::OutOfRange { .. }), "{err}");
    // A side that never reported has zero counts.
    store
        .insert_arrangement(&ArrangementRecord::new(
            "a2",
            Role::Primary,
            fp(2),
            State::Active,
            "r",
            10,
        ))
        .unwrap();
    assert_eq!(store.usage_totals("a2").unwrap().1.connections, 0);
}

#[test]
fn verify_catches_a_state_that_disagrees_with_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p2pcdn.db");
    let store = Store::open(&path).unwrap();
    store
        .insert_arrangement(&ArrangementRecord::new(
            "a1",
            Role::Primary,
            fp(2),
            State::Requested,
            "r",
            10,
        ))
        .unwrap();
    store.verify().unwrap();
    raw(&path)
        .execute("UPDATE arrangements SET state = 4", [])
        .unwrap();
    let err = store.verify().unwrap_err();
    assert!(
        err.to_string()
            .contains("a1 is active but its last event leads to requested"),
        "{err}"
    );
}

#[test]
fn arrangements_filter_by_role_state_peer_and_request() {
    let store = Store::open_in_memory().unwrap();
    let rows = [
        ("p1", Role::Primary, 2, State::Active, "r1", 10),
        ("p2", Role::Primary, 3, State::Offered, "r1", 20),
        ("v1", Role::Provider, 2, State::Active, "r9", 30),
        ("v2", Role::Provider, 4, State::Cancelled, "r8", 40),
    ];
    for (id, role, peer, state, req, at) in rows {
        store
            .insert_arrangement(&ArrangementRecord::new(id, role, fp(peer), state, req, at))
            .unwrap();
    }
    let ids = |f: ArrangementFilter| -> Vec<String> {
        store
            .arrangements(&f)
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect()
    };
    assert_eq!(ids(ArrangementFilter::default()), ["v2", "v1", "p2", "p1"]);
    assert_eq!(
        ids(ArrangementFilter {
            role: Some(Role::Primary),
            ..Default::default()
        }),
        ["p2", "p1"]
    );
    assert_eq!(
        ids(ArrangementFilter {
            states: vec![State::Active, State::Disbanding],
            ..Default::default()
        }),
        ["v1", "p1"]
    );
    assert_eq!(
        ids(ArrangementFilter {
            peer: Some(fp(2)),
            ..Default::default()
        }),
        ["v1", "p1"]
    );
    assert_eq!(
        ids(ArrangementFilter {
            request_id: Some("r1".into()),
            limit: Some(1),
            ..Default::default()
        }),
        ["p2"]
    );
    // A terminal arrangement inserted as such gets an end time.
    assert_eq!(store.arrangement("v2").unwrap().unwrap().ended_ms, Some(40));
    let counts = store.arrangement_counts().unwrap();
    assert_eq!(
        counts,
        vec![
            (State::Offered, 1),
            (State::Active, 2),
            (State::Cancelled, 1)
        ]
    );
}

#[test]
fn peers_keep_first_seen_and_track_liveness() {
    let store = Store::open_in_memory().unwrap();
    let mut peer = PeerRecord {
        fingerprint: fp(7),
        name: "edge-b".to_owned(),
        organisation: Some("Example".to_owned()),
        trust: TrustLevel::FirstContact,
        liveness: Liveness::Alive,
        liveness_ms: 100,
        control_endpoint: "127.0.0.1:7443".to_owned(),
        first_seen_ms: 100,
        last_seen_ms: 100,
        pinned_spki: vec![1, 2, 3],
    };
    store.upsert_peer(&peer).unwrap();
    peer.first_seen_ms = 500;
    peer.last_seen_ms = 500;
    peer.trust = TrustLevel::Allowed;
    store.upsert_peer(&peer).unwrap();
    let got = store.peer(&fp(7)).unwrap().unwrap();
    assert_eq!(
        (got.first_seen_ms, got.last_seen_ms, got.trust),
        (100, 500, TrustLevel::Allowed)
    );

    assert!(store.set_liveness(&fp(7), Liveness::Suspect, 600).unwrap());
    let got = store.peer(&fp(7)).unwrap().unwrap();
    assert_eq!(
        (got.liveness, got.liveness_ms, got.last_seen_ms),
        (Liveness::Suspect, 600, 500)
    );
    assert!(store.set_liveness(&fp(7), Liveness::Alive, 700).unwrap());
    assert_eq!(store.peer(&fp(7)).unwrap().unwrap().last_seen_ms, 700);
    assert!(!store.set_liveness(&fp(8), Liveness::Dead, 700).unwrap());
    assert_eq!(store.peers().unwrap().len(), 1);
    assert!(store.peer(&fp(8)).unwrap().is_none());
}

#[test]
fn policy_rules_are_added_listed_and_removed() {
    let store = Store::open_in_memory().unwrap();
    let deny = store
        .add_policy_rule(&PolicyRule {
            id: 0,
            action: RuleAction::Deny,
            subject: RuleSubject::Fingerprint(fp(9)),
            note: "abuse".to_owned(),
            created_ms: 10,
        })
        .unwrap();
    let allow = store
        .add_policy_rule(&PolicyRule {
            id: 0,
            action: RuleAction::Allow,
            subject: RuleSubject::Organisation("Example CDN".to_owned()),
            note: String::new(),
            created_ms: 20,
        })
        .unwrap();
    let rules = store.policy_rules().unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(
        (rules[0].id, rules[0].action, &rules[0].subject),
        (deny, RuleAction::Deny, &RuleSubject::Fingerprint(fp(9)))
    );
    assert_eq!(
        rules[1].subject,
        RuleSubject::Organisation("Example CDN".to_owned())
    );
    assert!(store.remove_policy_rule(deny).unwrap());
    assert!(!store.remove_policy_rule(deny).unwrap());
    assert_eq!(
        store
            .policy_rules()
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        [allow]
    );
}

#[test]
fn adverts_only_move_forward_and_expire() {
    let store = Store::open_in_memory().unwrap();
    assert!(store.put_advert(&fp(1), 5, b"five", 100, 1_000).unwrap());
    assert!(!store.put_advert(&fp(1), 4, b"four", 200, 2_000).unwrap());
    assert!(
        !store
            .put_advert(&fp(1), 5, b"five again", 200, 2_000)
            .unwrap()
    );
    assert!(store.put_advert(&fp(1), 6, b"six", 300, 3_000).unwrap());
    assert!(store.put_advert(&fp(2), 1, b"other", 300, 500).unwrap());
    let adverts = store.adverts().unwrap();
    assert_eq!(adverts.len(), 2);
    assert_eq!(
        (
            adverts[0].sequence,
            adverts[0].signed.as_slice(),
            adverts[0].expires_ms
        ),
        (6, &b"six"[..], 3_000)
    );
    assert_eq!(store.delete_expired_adverts(500).unwrap(), 1);
    assert_eq!(store.adverts().unwrap().len(), 1);
    assert!(store.delete_advert(&fp(1)).unwrap());
    assert!(store.adverts().unwrap().is_empty());
    assert!(matches!(
        store.put_advert(&fp(1), u64::MAX, b"x", 1, 2),
        Err(StoreError::OutOfRange { .. })
    ));
}

#[test]
fn negotiations_run_once_and_end_once() {
    let store = Store::open_in_memory().unwrap();
    let req = pb::ServiceRequirements {
        request_id: "req-7".to_owned(),
        service: Some(pb::ServiceSpec {
            name: "video".to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    };
    store.begin_negotiation(&req, 100).unwrap();
    assert!(matches!(
        store.begin_negotiation(&req, 100),
        Err(StoreError::DuplicateNegotiation(_))
    ));
    let unfinished = store.unfinished_negotiations().unwrap();
    assert_eq!(unfinished.len(), 1);
    assert_eq!(
        (
            unfinished[0].service.as_str(),
            unfinished[0].requirements.as_ref()
        ),
        ("video", Some(&req))
    );
    assert!(matches!(
        store.finish_negotiation("req-7", NegotiationState::Running, 0, "", 1),
        Err(StoreError::NotAnOutcome(_))
    ));
    let done = store
        .finish_negotiation(
            "req-7",
            NegotiationState::Partial,
            300,
            "1 of 2 offers",
            200,
        )
        .unwrap();
    assert_eq!(
        (done.state, done.ended_ms, done.covered_conn_per_s),
        (NegotiationState::Partial, Some(200), 300)
    );
    let err = store
        .finish_negotiation("req-7", NegotiationState::Failed, 0, "", 300)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "negotiation req-7 already ended as partial"
    );
    assert!(store.unfinished_negotiations().unwrap().is_empty());
    assert_eq!(store.negotiations(10).unwrap().len(), 1);
    assert!(matches!(
        store.finish_negotiation("ghost", NegotiationState::Failed, 0, "", 1),
        Err(StoreError::UnknownNegotiation(_))
    ));
}

#[test]
fn reputation_keeps_the_latest_statement_per_reporter() {
    let store = Store::open_in_memory().unwrap();
    let report = |reporter: u8, sequence: u64, score_ppm: u32| ReputationRecord {
        subject: fp(1),
        reporter: fp(reporter),
        sequence,
        score_ppm,
        samples: 100,
        mismatches: 1,
        unanswered: 0,
        window_end_ms: 1_000,
        received_ms: 1_001,
        signed: vec![sequence.to_le_bytes()[0]],
    };
    assert!(store.put_reputation(&report(2, 1, 900_000)).unwrap());
    assert!(store.put_reputation(&report(2, 2, 800_000)).unwrap());
    assert!(!store.put_reputation(&report(2, 1, 999_999)).unwrap());
    assert!(store.put_reputation(&report(3, 1, 500_000)).unwrap());
    let got = store.reputation_of(&fp(1)).unwrap();
    assert_eq!(
        got.iter()
            .map(|r| (r.reporter, r.score_ppm))
            .collect::<Vec<_>>(),
        [(fp(2), 800_000), (fp(3), 500_000)]
    );
    assert!(store.reputation_of(&fp(2)).unwrap().is_empty());
    // Scores are parts per million: the schema refuses more.
    assert!(store.put_reputation(&report(4, 1, 1_000_001)).is_err());
}

#[test]
fn backup_copies_a_consistent_database_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("p2pcdn.db")).unwrap();
    store
        .insert_arrangement(&ArrangementRecord::new(
            "a1",
            Role::Primary,
            fp(2),
            State::Active,
            "r",
            10,
        ))
        .unwrap();
    let copy = dir.path().join("backup.db");
    store.backup_to(&copy).unwrap();
    assert!(matches!(
        store.backup_to(&copy),
        Err(StoreError::BackupExists(_))
    ));
    let restored = Store::open(&copy).unwrap();
    assert_eq!(
        restored.arrangement("a1").unwrap().unwrap().state,
        State::Active
    );
    restored.verify().unwrap();
}

#[test]
fn clones_share_one_database_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("p2pcdn.db")).unwrap();
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            thread::spawn(move || {
                for i in 0..25 {
                    let id = format!("t{t}-{i}");
                    store
                        .insert_arrangement(&ArrangementRecord::new(
                            &id,
                            Role::Provider,
                            fp(5),
                            State::Offered,
                            "r",
                            1,
                        ))
                        .unwrap();
                    store
                        .transition(
                            &id,
                            &[State::Offered],
                            State::Accepted,
                            2,
                            "",
                            ArrangementChanges::default(),
                        )
                        .unwrap();
                    store
                        .transition(
                            &id,
                            &[State::Accepted],
                            State::Active,
                            3,
                            "",
                            ArrangementChanges::default(),
                        )
                        .unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let report = store.verify().unwrap();
    assert_eq!((report.arrangements, report.events), (100, 300));
}
