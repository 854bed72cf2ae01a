//! The rules a user would notice, one test each.

use prost::Message as _;

use super::*;
use crate::{identity::NodeIdentity, proto};

const T0: UnixMs = 1_700_000_000_000;

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

fn engine(pre: &[Fingerprint]) -> TrustEngine {
    TrustEngine::new(fp(0), TrustSettings::default(), pre.iter().copied()).unwrap()
}

fn own(path: &str) -> ObjectRef {
    ObjectRef {
        owner: fp(0),
        path: path.to_owned(),
        range: None,
    }
}

fn verified(e: &mut TrustEngine, subject: Fingerprint, id: u64, at: UnixMs) -> Option<Decision> {
    e.observe(
        subject,
        Observation {
            id,
            at,
            outcome: Outcome::Verified {
                object: own(&format!("/o/{id}")),
                latency_ms: 40.0,
            },
        },
    )
}

fn corrupted(
    e: &mut TrustEngine,
    subject: Fingerprint,
    id: u64,
    object: ObjectRef,
    at: UnixMs,
) -> Option<Decision> {
    e.observe(
        subject,
        Observation {
            id,
            at,
            outcome: Outcome::Corrupted {
                object,
                detail: "sha256 mismatch".into(),
            },
        },
    )
}

/// `n` clean samples of `subject`, ids from `first`.
fn clean_run(e: &mut TrustEngine, subject: Fingerprint, first: u64, n: u64, at: UnixMs) {
    for i in 0..n {
        verified(e, subject, first + i, at);
    }
}

fn node() -> NodeIdentity {
    NodeIdentity::generate("sim", "Example CDN", &[]).unwrap()
}

fn report(subject: Fingerprint, at: UnixMs, sequence: u64) -> pb::ReputationReport {
    pb::ReputationReport {
        subject: subject.0.to_vec(),
        samples: 20,
        mismatches: 0,
        answered_in_sla: 20,
        score_ppm: 900_000,
        window_start_ms: at - 60_000,
        window_end_ms: at,
        sequence,
        ..Default::default()
    }
}

#[test]
fn a_corruption_quarantines_at_once_and_asks_for_a_recheck() {
    let h = fp(1);
    let mut e = engine(&[]);
    clean_run(&mut e, h, 1, 30, T0);
    e.tick(T0);
    assert!(e.weight_factor(&h, T0) > 0.0);
    let d = corrupted(&mut e, h, 99, own("/bad.js"), T0 + 10).unwrap();
    assert_eq!(d.kind, DecisionKind::Quarantine);
    assert_eq!(d.sample_ids(), vec![99]);
    assert_eq!(e.state(&h), State::Quarantined);
    assert_eq!(
        e.weight_factor(&h, T0 + 10),
        0.0,
        "weight 0 before any tick"
    );
    assert!(e.excluded(&h));
    let checks = e.checks(T0 + 10);
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].object, own("/bad.js"));
    assert!(matches!(checks[0].why, CheckWhy::Recheck { sample: 99 }));
    // The next tick reports the decision made at once.
    let ticked = e.tick(T0 + 20);
    assert!(ticked.iter().any(|d| d.kind == DecisionKind::Quarantine));
}

#[test]
fn a_confirming_sample_isolates_for_dishonesty() {
    let h = fp(1);
    let mut e = engine(&[]);
    clean_run(&mut e, h, 1, 30, T0);
    corrupted(&mut e, h, 99, own("/bad.js"), T0);
    let d = corrupted(&mut e, h, 100, own("/bad.js"), T0 + 100).unwrap();
    assert_eq!(d.kind, DecisionKind::Isolate { dishonest: true });
    assert_eq!(d.reason, Reason::ConfirmedCorruption);
    assert_eq!(d.sample_ids(), vec![99, 100], "{}", d.evidence_text());
    assert_eq!(e.state(&h), State::Isolated);
    assert_eq!(e.weight_factor(&h, T0 + 100), 0.0);
    // A second corruption of another object while quarantined isolates too.
    let g = fp(2);
    clean_run(&mut e, g, 200, 30, T0);
    corrupted(&mut e, g, 300, own("/a.js"), T0);
    let d = corrupted(&mut e, g, 301, own("/b.js"), T0 + 1).unwrap();
    assert_eq!(d.kind, DecisionKind::Isolate { dishonest: true });
    assert_eq!(d.reason, Reason::SecondCorruption);
}

#[test]
fn an_intact_recheck_releases_on_probation() {
    let h = fp(1);
    let mut e = engine(&[h]);
    clean_run(&mut e, h, 1, 30, T0);
    corrupted(&mut e, h, 99, own("/bad.js"), T0);
    let d = e
        .observe(
            h,
            Observation {
                id: 100,
                at: T0 + 50,
                outcome: Outcome::Verified {
                    object: own("/bad.js"),
                    latency_ms: 30.0,
                },
            },
        )
        .unwrap();
    assert_eq!(d.kind, DecisionKind::Release);
    assert_eq!(d.reason, Reason::CleanRecheck);
    assert_eq!(e.state(&h), State::Probation);
    let f = e.weight_factor(&h, T0 + 50);
    assert!(
        f > 0.0 && f <= TrustSettings::default().probation_cap,
        "{f}"
    );
    assert!(e.checks(T0 + 50).is_empty());
}

#[test]
fn a_slow_answer_weighs_far_less_than_a_corruption() {
    let (slow, bad) = (fp(1), fp(2));
    let mut e = engine(&[slow, bad]);
    clean_run(&mut e, slow, 1, 20, T0);
    clean_run(&mut e, bad, 100, 20, T0);
    let base = e.assess(&slow, T0).unwrap().trust;
    e.observe(
        slow,
        Observation {
            id: 50,
            at: T0,
            outcome: Outcome::Answered { latency_ms: 3000.0 },
        },
    );
    corrupted(&mut e, bad, 150, own("/x"), T0);
    let after_slow = e.assess(&slow, T0).unwrap().trust;
    let after_bad = e.assess(&bad, T0).unwrap().trust;
    assert!(after_slow > 0.95 * base, "{base} -> {after_slow}");
    assert!(
        (base - after_bad) > 10.0 * (base - after_slow),
        "slow {after_slow}, corrupt {after_bad}, base {base}"
    );
    // Slowness alone never isolates: a peer that is always late keeps 3/4 of its score.
    let (late, prompt) = (fp(3), fp(4));
    for i in 0..200 {
        for (peer, latency_ms) in [(late, 5000.0), (prompt, 50.0)] {
            e.observe(
                peer,
                Observation {
                    id: 1000 + i,
                    at: T0,
                    outcome: Outcome::Answered { latency_ms },
                },
            );
        }
    }
    e.tick(T0);
    assert_ne!(e.state(&late), State::Isolated);
    let ratio = e.assess(&late, T0).unwrap().score / e.assess(&prompt, T0).unwrap().score;
    assert!(ratio > 0.74, "{ratio}");
}

#[test]
fn decay_forgets_old_failures() {
    let h = fp(1);
    let mut e = engine(&[h]);
    for i in 0..3 {
        e.observe(
            h,
            Observation {
                id: i,
                at: T0,
                outcome: Outcome::Unavailable {
                    detail: "timeout".into(),
                },
            },
        );
    }
    let fresh = e.assess(&h, T0).unwrap();
    let later = T0 + 10 * TrustSettings::default().half_life_ms;
    let old = e.assess(&h, later).unwrap();
    let avail = |a: &Assessment| a.dimensions[Dimension::Availability.index()].score;
    assert!(avail(&fresh) < 0.4, "{}", avail(&fresh));
    assert!(avail(&old) > 0.89, "{}", avail(&old));
    assert!(old.trust > 2.0 * fresh.trust);
}

#[test]
fn unreliable_peers_are_isolated_then_restored_on_probation_and_recover() {
    let h = fp(1);
    let mut e = engine(&[]);
    for i in 0..8 {
        e.observe(
            h,
            Observation {
                id: i,
                at: T0,
                outcome: Outcome::Unavailable {
                    detail: "connection refused".into(),
                },
            },
        );
    }
    let d = e.tick(T0);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].kind, DecisionKind::Isolate { dishonest: false });
    assert_eq!(d[0].reason, Reason::LowScore);
    assert!(d[0].sample_ids().len() >= 4, "{}", d[0].evidence_text());
    let hold = TrustSettings::default().hold_unreliable_ms;
    assert!(e.tick(T0 + hold - 1).is_empty());
    let d = e.tick(T0 + hold);
    assert_eq!(d[0].kind, DecisionKind::Restore);
    assert_eq!(e.state(&h), State::Probation);
    let t = T0 + hold + 1000;
    clean_run(&mut e, h, 100, 10, t);
    let d = e.tick(t);
    assert_eq!(d[0].kind, DecisionKind::Recover, "{d:?}");
    assert_eq!(e.state(&h), State::Trusted);
}

#[test]
fn a_flapping_peer_loses_weight_but_is_not_isolated() {
    let (flap, steady) = (fp(1), fp(2));
    let mut e = engine(&[]);
    for i in 0..100 {
        clean_run(&mut e, steady, 1000 + i, 1, T0 + i as i64 * 1000);
        if i % 10 < 3 {
            e.observe(
                flap,
                Observation {
                    id: i,
                    at: T0 + i as i64 * 1000,
                    outcome: Outcome::Unavailable {
                        detail: "down".into(),
                    },
                },
            );
        } else {
            verified(&mut e, flap, i, T0 + i as i64 * 1000);
        }
        e.tick(T0 + i as i64 * 1000);
    }
    let now = T0 + 100_000;
    assert_ne!(e.state(&flap), State::Isolated);
    let (f, s) = (e.weight_factor(&flap, now), e.weight_factor(&steady, now));
    assert!(f < 0.8 * s && f > 0.3 * s, "flapping {f}, steady {s}");
}

#[test]
fn a_capacity_liar_is_isolated_as_dishonest() {
    let liar = fp(1);
    let mut e = engine(&[]);
    clean_run(&mut e, liar, 1, 20, T0);
    let mut isolated = None;
    for i in 0..5 {
        let at = T0 + i * 1000;
        e.observe(
            liar,
            Observation {
                id: 100 + i as u64,
                at,
                outcome: Outcome::Capacity {
                    advertised: 3000.0,
                    measured: 1000.0,
                },
            },
        );
        if let Some(d) = e
            .tick(at)
            .into_iter()
            .find(|d| matches!(d.kind, DecisionKind::Isolate { .. }))
        {
            isolated = Some((i, d));
            break;
        }
    }
    let (i, d) = isolated.unwrap();
    assert!(i <= 3, "isolated after {} measurements", i + 1);
    assert_eq!(d.kind, DecisionKind::Isolate { dishonest: true });
    assert!(
        d.evidence_text().contains("capacity_honesty"),
        "{}",
        d.evidence_text()
    );
}

#[test]
fn weight_factor_follows_trust() {
    let (a, b, c) = (fp(1), fp(2), fp(3));
    let mut e = engine(&[a, b]);
    clean_run(&mut e, a, 1, 40, T0);
    clean_run(&mut e, b, 100, 40, T0);
    for i in 0..6 {
        e.observe(
            b,
            Observation {
                id: 200 + i,
                at: T0,
                outcome: Outcome::Unavailable {
                    detail: "timeout".into(),
                },
            },
        );
    }
    e.tick(T0);
    for id in [a, b] {
        let x = e.assess(&id, T0).unwrap();
        assert_eq!(x.state, State::Trusted);
        assert!((x.weight_factor - x.trust).abs() < 1e-12);
    }
    assert!(e.weight_factor(&a, T0) > e.weight_factor(&b, T0));
    // A new identity: low standing, so low weight, and capped on probation.
    clean_run(&mut e, c, 300, 2, T0);
    let x = e.assess(&c, T0).unwrap();
    assert_eq!(x.state, State::Probation);
    assert!(x.standing < 0.15 && x.weight_factor < 0.15, "{x:?}");
    assert_eq!(
        e.weight_factor(&fp(9), T0),
        0.0,
        "unknown peers get nothing"
    );
}

#[test]
fn a_liars_bad_mouthing_does_not_isolate_an_honest_peer() {
    let liar_id = node();
    let liar = liar_id.fingerprint;
    let h = fp(1);
    // Worst case: the liar is even one of our long-term (pre-trusted) peers.
    let mut e = engine(&[liar]);
    clean_run(&mut e, h, 1, 30, T0);
    e.tick(T0);
    let before = e.weight_factor(&h, T0);
    let mut lie = report(h, T0, 1);
    lie.mismatches = 10;
    lie.confirmed_mismatches = 10;
    lie.mismatched_paths = vec!["/liar/object.js".into()];
    let signed = proto::sign_reputation(&liar_id, &lie);
    let got = e.ingest_report(&signed, &liar_id.spki_der, T0).unwrap();
    assert_eq!(got.comparison, Comparison::Contradicts);
    let d = e.tick(T0 + 1);
    assert!(d.is_empty(), "{d:?}");
    assert_ne!(e.state(&h), State::Isolated);
    assert!(e.weight_factor(&h, T0 + 1) > 0.8 * before);
    // We fetch the object it named: intact, so the claim is refuted.
    let check = e.checks(T0 + 1).pop().unwrap();
    assert_eq!(check.object.owner, liar);
    e.observe(
        h,
        Observation {
            id: 500,
            at: T0 + 2,
            outcome: Outcome::Verified {
                object: check.object,
                latency_ms: 20.0,
            },
        },
    );
    e.tick(T0 + 3);
    let agreement = e.assess(&liar, T0 + 3).unwrap().as_reporter.agreement;
    assert!(agreement < 0.35, "{agreement}");
    // Its next lie is not even checked any more.
    let mut again = lie.clone();
    again.sequence = 2;
    again.window_end_ms = T0 + 3;
    e.ingest_report(
        &proto::sign_reputation(&liar_id, &again),
        &liar_id.spki_der,
        T0 + 3,
    )
    .unwrap();
    assert!(e.checks(T0 + 3).is_empty());
    for t in 4..20 {
        assert!(e.tick(T0 + t).is_empty());
    }
    assert_ne!(e.state(&h), State::Isolated);
}

#[test]
fn sybil_praise_cannot_raise_a_bad_peer() {
    let bad = fp(1);
    let honest_id = node();
    let sybils: Vec<NodeIdentity> = (0..20).map(|_| node()).collect();
    let mut e = engine(&[]);
    verified(&mut e, bad, 1, T0);
    e.tick(T0);
    let alone = e.weight_factor(&bad, T0);
    for (n, s) in sybils.iter().enumerate() {
        // Sybils vouch for the bad peer and for each other.
        let mut praise = report(bad, T0, 1);
        praise.samples = 1000;
        praise.answered_in_sla = 1000;
        e.ingest_report(&proto::sign_reputation(s, &praise), &s.spki_der, T0)
            .unwrap();
        let other = &sybils[(n + 1) % sybils.len()];
        let mut mutual = report(other.fingerprint, T0, 2);
        mutual.samples = 1000;
        e.ingest_report(&proto::sign_reputation(s, &mutual), &s.spki_der, T0)
            .unwrap();
    }
    e.tick(T0 + 1);
    let praised = e.weight_factor(&bad, T0 + 1);
    assert!(praised < alone + 0.01, "{alone} -> {praised}");
    for s in &sybils {
        assert!(e.credibility(&s.fingerprint) < 0.01);
    }
    // An established reporter we observed ourselves is heard (its report moves the score)
    // but does not vouch for a newcomer's standing; one of our long-term peers does.
    clean_run(&mut e, honest_id.fingerprint, 10, 40, T0);
    // EigenTrust runs every `eigen_every_ms`.
    let t = T0 + TrustSettings::default().eigen_every_ms + 1;
    e.tick(t);
    assert!(e.credibility(&honest_id.fingerprint) > 0.5);
    e.set_pre_trusted([honest_id.fingerprint]);
    let mut vouch = report(bad, t, 1);
    vouch.samples = 40;
    e.ingest_report(
        &proto::sign_reputation(&honest_id, &vouch),
        &honest_id.spki_der,
        t,
    )
    .unwrap();
    e.tick(t + 1);
    assert!(e.weight_factor(&bad, t + 1) > praised + 0.05);
    // And once the bad peer is caught, praise changes nothing.
    corrupted(&mut e, bad, 20, own("/x"), t + 2);
    corrupted(&mut e, bad, 21, own("/x"), t + 3);
    assert_eq!(e.state(&bad), State::Isolated);
    e.tick(t + 4);
    assert_eq!(e.weight_factor(&bad, t + 4), 0.0);
}

#[test]
fn a_corruption_of_a_named_object_needs_our_own_confirming_sample() {
    let reporter_id = node();
    let r = reporter_id.fingerprint;
    let s = fp(1);
    let mut e = engine(&[r]);
    clean_run(&mut e, s, 1, 10, T0);
    let mut claim = report(s, T0, 1);
    claim.mismatches = 2;
    claim.confirmed_mismatches = 1;
    claim.mismatched_paths = vec!["/app.js".into()];
    e.ingest_report(
        &proto::sign_reputation(&reporter_id, &claim),
        &reporter_id.spki_der,
        T0,
    )
    .unwrap();
    let check = e.checks(T0).pop().unwrap();
    assert!(matches!(check.why, CheckWhy::Claim { .. }));
    // Our own sample of the named object is corrupted: quarantine, the claim in evidence.
    let d = corrupted(&mut e, s, 42, check.object.clone(), T0 + 1).unwrap();
    assert_eq!(d.kind, DecisionKind::Quarantine);
    assert_eq!(d.report_ids()[0].reporter, r);
    // The confirming sample isolates, with both samples and the report as evidence.
    let d = corrupted(&mut e, s, 43, check.object, T0 + 1).unwrap();
    assert_eq!(d.kind, DecisionKind::Isolate { dishonest: true });
    assert_eq!(d.reason, Reason::ConfirmedCorruption);
    assert_eq!(d.sample_ids(), vec![42, 43]);
    assert_eq!(d.report_ids().len(), 1);
    assert_eq!(d.report_ids()[0].reporter, r);
    assert!(e.assess(&r, T0 + 1).unwrap().as_reporter.agreement > 0.8);
}

#[test]
fn credible_claims_quarantine_pending_our_own_check() {
    let ids: Vec<NodeIdentity> = (0..2).map(|_| node()).collect();
    let s = fp(1);
    let pre: Vec<Fingerprint> = ids.iter().map(|i| i.fingerprint).collect();
    let mut e = engine(&pre);
    verified(&mut e, s, 1, T0);
    for (n, id) in ids.iter().enumerate() {
        let mut claim = report(s, T0, 1);
        claim.mismatches = 3;
        claim.confirmed_mismatches = 1;
        claim.mismatched_paths = vec![format!("/obj/{n}")];
        e.ingest_report(&proto::sign_reputation(id, &claim), &id.spki_der, T0)
            .unwrap();
    }
    let d = e.tick(T0);
    assert_eq!(d[0].kind, DecisionKind::Quarantine);
    assert_eq!(d[0].reason, Reason::CredibleClaims);
    assert_eq!(d[0].report_ids().len(), 2);
    assert_eq!(e.weight_factor(&s, T0), 0.0);
    // Both named objects come back intact: the claims are refuted and the peer released.
    for check in e.checks(T0) {
        e.observe(
            s,
            Observation {
                id: 7,
                at: T0 + 1,
                outcome: Outcome::Verified {
                    object: check.object,
                    latency_ms: 10.0,
                },
            },
        );
    }
    let d = e.tick(T0 + 2);
    assert_eq!(d[0].kind, DecisionKind::Release, "{d:?}");
    assert_eq!(d[0].reason, Reason::ClaimsWithdrawn);
}

#[test]
fn reports_state_direct_observations_only() {
    let other = node();
    let (h, g) = (fp(1), fp(2));
    let mut e = engine(&[other.fingerprint]);
    clean_run(&mut e, h, 1, 5, T0);
    corrupted(&mut e, h, 9, own("/broken.css"), T0);
    // Hearsay about h and g.
    for subject in [h, g] {
        let mut r = report(subject, T0, 1);
        r.samples = 500;
        e.ingest_report(&proto::sign_reputation(&other, &r), &other.spki_der, T0)
            .unwrap();
    }
    e.tick(T0);
    let reports = e.reports(T0);
    assert_eq!(reports.len(), 1, "nothing to say about g: {reports:?}");
    let r = &reports[0];
    assert_eq!(r.subject, h.0.to_vec());
    assert_eq!((r.samples, r.mismatches), (6, 1));
    assert_eq!(r.mismatched_paths, vec!["/broken.css".to_owned()]);
    assert!(r.window_start_ms <= T0 && r.window_end_ms == T0);
    check_shape(r, T0).unwrap();
    // Not due again until something new; a new corruption is due at once.
    assert!(e.reports(T0 + 1).is_empty());
    verified(&mut e, h, 10, T0 + 2);
    assert!(e.reports(T0 + 2).is_empty(), "interval not over");
    assert_eq!(e.reports(T0 + 6000).len(), 1);
    corrupted(&mut e, h, 11, own("/other"), T0 + 6001);
    let r = e.reports(T0 + 6001).pop().unwrap();
    assert_eq!(r.confirmed_mismatches, 1);
    assert!(r.sequence > reports[0].sequence);
}

#[test]
fn malformed_and_forged_reports_are_refused() {
    let reporter = node();
    let mallory = node();
    let h = fp(1);
    let mut e = engine(&[]);
    let good = report(h, T0, 5);
    let sign = |r: &pb::ReputationReport| proto::sign_reputation(&reporter, r);
    let open = |e: &mut TrustEngine, s: &pb::SignedReputationReport| {
        e.ingest_report(s, &reporter.spki_der, T0)
    };
    // A flipped signature bit.
    let mut bad_sig = sign(&good);
    bad_sig.signature[3] ^= 0x10;
    assert!(matches!(
        open(&mut e, &bad_sig),
        Err(ReportError::Forged(_))
    ));
    // Signed by someone else, claiming to be `reporter`.
    let mut impostor = sign(&good);
    impostor.signature = mallory.sign(proto::REPUTATION_DOMAIN, &impostor.report);
    assert!(matches!(
        open(&mut e, &impostor),
        Err(ReportError::Forged(_))
    ));
    // Verified against the wrong key.
    assert!(matches!(
        e.ingest_report(&sign(&good), &mallory.spki_der, T0),
        Err(ReportError::Forged(_))
    ));
    // About itself.
    let mut me = good.clone();
    me.subject = reporter.fingerprint.0.to_vec();
    assert!(matches!(
        open(&mut e, &sign(&me)),
        Err(ReportError::SelfReport)
    ));
    // From the future.
    let mut future = good.clone();
    future.window_end_ms = T0 + 3_600_000;
    assert!(matches!(
        open(&mut e, &sign(&future)),
        Err(ReportError::FutureWindow { .. })
    ));
    let mut inverted = good.clone();
    inverted.window_start_ms = T0 + 1;
    assert!(matches!(
        open(&mut e, &sign(&inverted)),
        Err(ReportError::InvertedWindow { .. })
    ));
    // Absurd counts.
    for mutate in [
        (|r: &mut pb::ReputationReport| r.mismatches = r.samples + 1) as fn(&mut _),
        |r| r.samples = MAX_REPORT_COUNT + 1,
        |r| r.capacity_shortfalls = 1,
        |r| r.score_ppm = 2_000_000,
    ] {
        let mut absurd = good.clone();
        mutate(&mut absurd);
        let err = open(&mut e, &sign(&absurd)).unwrap_err();
        assert!(matches!(err, ReportError::Absurd { .. }), "{err}");
    }
    let mut paths = good.clone();
    paths.mismatches = 10;
    paths.mismatched_paths = (0..5).map(|i| format!("/{i}")).collect();
    assert!(matches!(
        open(&mut e, &sign(&paths)),
        Err(ReportError::BadEvidence { .. })
    ));
    // Oversize and undecodable.
    let mut big = good.clone();
    big.mismatches = 1;
    big.mismatched_paths = vec![format!("/{}", "x".repeat(4000))];
    assert!(matches!(
        open(&mut e, &sign(&big)),
        Err(ReportError::TooLarge { .. })
    ));
    let junk = pb::SignedReputationReport {
        report: vec![0xff; 40],
        signature: vec![0; 64],
    };
    assert!(matches!(
        open(&mut e, &junk),
        Err(ReportError::Decode { .. })
    ));
    let short = pb::SignedReputationReport {
        report: pb::ReputationReport {
            reporter: vec![1; 5],
            ..good.clone()
        }
        .encode_to_vec(),
        signature: vec![0; 64],
    };
    assert!(matches!(
        open(&mut e, &short),
        Err(ReportError::NodeId { .. })
    ));
    // The good one passes once; a replay or an older sequence does not.
    open(&mut e, &sign(&good)).unwrap();
    assert!(matches!(
        open(&mut e, &sign(&good)),
        Err(ReportError::Replayed { .. })
    ));
    // Too old.
    let mut stale = good.clone();
    stale.sequence = 9;
    stale.window_end_ms = T0 - 2 * TrustSettings::default().max_report_age_ms;
    stale.window_start_ms = stale.window_end_ms - 1;
    assert!(matches!(
        open(&mut e, &sign(&stale)),
        Err(ReportError::Stale { .. })
    ));
    // Our own report echoed back.
    let mut mine = TrustEngine::new(reporter.fingerprint, TrustSettings::default(), []).unwrap();
    assert!(matches!(
        mine.ingest_report(&sign(&report(h, T0, 7)), &reporter.spki_der, T0),
        Err(ReportError::FromSelf)
    ));
    // Nothing refused changed the peer.
    assert_eq!(e.assess(&h, T0).map(|a| a.claims), Some(0.0));
}

#[test]
fn assessments_serialise_for_peers_json() {
    let h = fp(1);
    let mut e = engine(&[]);
    clean_run(&mut e, h, 1, 3, T0);
    corrupted(&mut e, h, 4, own("/x"), T0);
    e.tick(T0);
    let json = serde_json::to_value(e.assessments(T0)).unwrap();
    let a = &json[0];
    assert_eq!(a["state"], "quarantined");
    assert_eq!(a["decisions"][0]["decision"], "quarantine");
    assert_eq!(a["decisions"][0]["evidence"][0]["id"], 4);
    assert_eq!(a["pending_checks"][0]["why"], "recheck");
    assert!(a["dimensions"][0]["direct"]["failures"].as_f64().unwrap() > 20.0);
}

#[test]
fn settings_are_validated() {
    TrustSettings::default().validate().unwrap();
    let bad = TrustSettings {
        isolation_threshold: 1.5,
        ..TrustSettings::default()
    };
    assert_eq!(bad.validate().unwrap_err().name, "isolation_threshold");
    assert!(TrustEngine::new(fp(0), bad, []).is_err());
}
