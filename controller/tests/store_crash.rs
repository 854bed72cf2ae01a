//! Crash consistency: a child process that changes arrangements as fast as it can is killed
//! with SIGKILL at arbitrary moments; after each kill the store must open, pass its checks, and
//! every arrangement's state must be the one its last history event leads to.
//!
//! The child is this test executable itself, re-run with `CHILD_ENV` set: the same `#[test]`
//! function then plays the writer instead of the checker.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::{
    os::unix::process::ExitStatusExt,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use p2pcdn_controller::{
    model::{Fingerprint, Role},
    proto::pb,
    store::{
        ArrangementChanges, ArrangementFilter, ArrangementRecord, NegotiationState, State, Store,
        UsageEntry, UsageKind, UsageSource, legal_edge,
    },
};

const CHILD_ENV: &str = "P2PCDN_STORE_CRASH_CHILD_DB";
const TEST_NAME: &str = "kill_9_mid_write_leaves_a_consistent_store";
/// The child stops by itself after this long if nobody kills it (it always is killed sooner).
const CHILD_MAX: Duration = Duration::from_secs(60);
const CHILD_MAX_ROUNDS: u64 = 1_000_000;
/// How many times the writer is killed.
const KILLS: usize = 40;

#[test]
fn kill_9_mid_write_leaves_a_consistent_store() {
    if let Ok(db) = std::env::var(CHILD_ENV) {
        child_writer(Path::new(&db));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p2pcdn.db");
    let mut seen_before = 0usize;
    // Many kills after varied delays, so they land at many different points of the write
    // loop (a kill between two statements that belong together must happen in some round).
    let mut seed = 0x9e37_79b9_u64;
    for round in 0..KILLS {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let delay_ms = 5 + (seed >> 33) % 120;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &db)
            .env("P2PCDN_STORE_CRASH_ROUND", round.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the child has written something in this round, then let it run on.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                Instant::now() < deadline,
                "round {round}: the child wrote nothing"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "round {round}: the child exited on its own: {:?}",
                child.wait_with_output().unwrap()
            );
            if db.exists() {
                let count = count_arrangements(&db);
                if count > seen_before {
                    break;
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL on Unix
        let output = child.wait_with_output().unwrap();
        assert_eq!(
            output.status.signal(),
            Some(9),
            "round {round}: the child did not die by SIGKILL: {:?} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );

        let store = Store::open(&db).unwrap();
        let report = store.verify().unwrap();
        check_every_arrangement(&store);
        assert!(
            report.arrangements > seen_before,
            "round {round}: no progress ({} arrangements)",
            report.arrangements
        );
        seen_before = report.arrangements;
    }
    // The writer made real progress through the whole lifecycle.
    let store = Store::open(&db).unwrap();
    let disbanded = store
        .arrangements(&ArrangementFilter {
            states: vec![State::Disbanded],
            ..Default::default()
        })
        .unwrap();
    assert!(
        !disbanded.is_empty(),
        "no arrangement ever reached disbanded"
    );
}

/// Independent of `Store::verify`: walks each arrangement's events through the public API.
fn check_every_arrangement(store: &Store) {
    for rec in store.arrangements(&ArrangementFilter::default()).unwrap() {
        let events = store.events(&rec.id).unwrap();
        let first = events
            .first()
            .unwrap_or_else(|| panic!("{} has no history", rec.id));
        assert_eq!(first.from, None, "{}", rec.id);
        for pair in events.windows(2) {
            assert_eq!(pair[1].from, Some(pair[0].to), "{}: broken chain", rec.id);
            assert!(
                legal_edge(pair[0].to, pair[1].to),
                "{}: illegal edge",
                rec.id
            );
        }
        let last = events.last().unwrap();
        assert_eq!(
            rec.state, last.to,
            "{}: state disagrees with history",
            rec.id
        );
        assert_eq!(
            rec.updated_ms, last.at_ms,
            "{}: update time disagrees",
            rec.id
        );
        match rec.state {
            State::Active | State::Disbanding => {
                assert!(
                    rec.activated_ms.is_some() && rec.terms.is_some(),
                    "{}",
                    rec.id
                );
            }
            State::Disbanded => {
                assert!(
                    rec.ended_ms.is_some() && rec.settlement.is_some(),
                    "{}",
                    rec.id
                );
                // The writer records the final usage before the Disbanded transition.
                let (local, _) = store.usage_totals(&rec.id).unwrap();
                assert!(local.is_final, "{}: disbanded without final usage", rec.id);
            }
            _ => {}
        }
    }
}

fn count_arrangements(db: &Path) -> usize {
    // A plain read-only connection: the checker must not interfere with the writer's schema.
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    conn.query_row("SELECT count(*) FROM arrangements", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_or(0, |n| usize::try_from(n).unwrap_or(0))
}

/// The child: runs arrangements through their lifecycle as fast as it can until killed.
fn child_writer(db: &Path) {
    let round = std::env::var("P2PCDN_STORE_CRASH_ROUND").unwrap();
    let store = Store::open(db).unwrap();
    let peer = Fingerprint([7; 32]);
    let started = Instant::now();
    let terms = pb::Offer {
        offer_id: "o".to_owned(),
        request_id: "r".to_owned(),
        provider: vec![7; 32],
        price: Some(pb::Price {
            per_gb_micros: 1_000,
            per_1000_connections_micros: 10,
            currency: "EUR".to_owned(),
        }),
        duration_s: 600,
        ..Default::default()
    };
    let none = ArrangementChanges::default;
    for i in 0..CHILD_MAX_ROUNDS {
        if started.elapsed() > CHILD_MAX {
            return;
        }
        let id = format!("r{round}-a{i}");
        let request_id = format!("r{round}-n{i}");
        let at = i64::try_from(i).unwrap() * 10;
        let req = pb::ServiceRequirements {
            request_id: request_id.clone(),
            service: Some(pb::ServiceSpec {
                name: "video".to_owned(),
                addresses: vec!["192.0.2.10:443".to_owned()],
                host_names: vec!["video.example".to_owned()],
            }),
            ..Default::default()
        };
        store.begin_negotiation(&req, at).unwrap();
        let mut rec =
            ArrangementRecord::new(&id, Role::Primary, peer, State::Requested, &request_id, at);
        rec.requirements = Some(req);
        store.insert_arrangement(&rec).unwrap();
        let offered = ArrangementChanges {
            terms: Some(terms.clone()),
            offer_id: Some(format!("o{i}")),
            ..Default::default()
        };
        store
            .transition(
                &id,
                &[State::Requested],
                State::Offered,
                at + 1,
                "offer",
                offered,
            )
            .unwrap();
        if i % 5 == 4 {
            store
                .transition(
                    &id,
                    &[State::Offered],
                    State::Cancelled,
                    at + 2,
                    "declined",
                    none(),
                )
                .unwrap();
            store
                .finish_negotiation(&request_id, NegotiationState::Failed, 0, "declined", at + 2)
                .unwrap();
            continue;
        }
        store
            .transition(
                &id,
                &[State::Offered],
                State::Accepted,
                at + 2,
                "accept",
                none(),
            )
            .unwrap();
        store
            .finish_negotiation(&request_id, NegotiationState::Succeeded, 500, "", at + 2)
            .unwrap();
        let active = ArrangementChanges {
            expires_ms: Some(at + 600_000),
            tunnel_sources: Some(vec!["192.0.2.1".to_owned()]),
            ..Default::default()
        };
        store
            .transition(
                &id,
                &[State::Accepted],
                State::Active,
                at + 3,
                "activate",
                active,
            )
            .unwrap();
        for beat in 1..=3u64 {
            for source in [UsageSource::Local, UsageSource::Peer] {
                store
                    .record_usage(&UsageEntry {
                        arrangement: id.clone(),
                        at_ms: at + 3 + i64::try_from(beat).unwrap(),
                        source,
                        kind: UsageKind::Heartbeat,
                        connections: beat * 100,
                        bytes: beat * 1_000_000,
                        packets: beat * 1_000,
                    })
                    .unwrap();
            }
        }
        if i % 3 == 2 {
            // Leave some arrangements active, as a crowd that is still going on.
            continue;
        }
        store
            .transition(
                &id,
                &[State::Active],
                State::Disbanding,
                at + 7,
                "crowd over",
                none(),
            )
            .unwrap();
        store
            .record_usage(&UsageEntry {
                arrangement: id.clone(),
                at_ms: at + 8,
                source: UsageSource::Local,
                kind: UsageKind::Final,
                connections: 300,
                bytes: 3_000_000,
                packets: 3_000,
            })
            .unwrap();
        let settled = ArrangementChanges {
            end_reason: Some("crowd-over".to_owned()),
            settlement: Some(pb::Settlement {
                charges_micros: 6,
                credit_micros: 0,
                total_micros: 6,
                currency: "EUR".to_owned(),
            }),
            ..Default::default()
        };
        store
            .transition(
                &id,
                &[State::Disbanding],
                State::Disbanded,
                at + 9,
                "settled",
                settled,
            )
            .unwrap();
    }
}
