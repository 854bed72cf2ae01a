//! The whole chain between two nodes on a network-namespace testbed: two `p2pcdn run`
//! daemons (an edge and a peer, each with the XDP redirector attached to its interface), a
//! real origin web server on the edge, a signed manifest served by a real static web server,
//! and a client sending new connections through the edge's XDP program. The testbed is
//! [`p2pcdn_tests::flashcrowd`]'s with one short-term peer.
//!
//! ```text
//!   client .1 ──┐            edge .2 (XDP, p2pcdn: primary, origin on the service address)
//!               br0 ──────── peer .3 (XDP, p2pcdn: provider, surrogate on the service address)
//! ```
//!
//! After a negotiation the edge's daemon has made the peer a steering target and the peer's
//! daemon allows the edge's tunnels and serves the edge's content; overflow connections are
//! answered by the peer's surrogate directly (DSR) with the primary's bytes, every request
//! succeeds, and after the disband both ledgers agree on the number of connections.
//!
//! Privileged; fails under `CI=true` without privileges.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::time::{Duration, Instant};

use p2pcdn_tests::{
    flashcrowd::{
        Agreement, CrowdConfig, CrowdRun, FlashCrowd, LedgerRow, MonitorTuning, ORIGIN_NAME,
        PeerSpec, WAIT,
    },
    loadgen::{Outcome, Phase},
    privilege::require_netns_admin,
};

/// One peer offering 500 connections/s (half of 1000); an edge admitting 10/s. `auto`: the
/// monitor reacts fast and gives back after 2 s of calm; otherwise it never fires (a
/// threshold of 1000 % of the capacity) and capacity is negotiated by hand.
fn setup(auto: bool) -> FlashCrowd {
    let mut config = CrowdConfig::demo(1.0);
    config.capacity = 10;
    config.origin_workers = 4;
    config.peers = vec![PeerSpec::new("peer", Agreement::ShortTerm, 1000)];
    config.monitor = auto.then_some(MonitorTuning {
        interval_ms: 100,
        window_ms: 1000,
        enter_ms: 300,
        exit_ms: 2000,
    });
    FlashCrowd::start(config, &mut |line| eprintln!("setup: {line}"))
        .unwrap_or_else(|e| panic!("the testbed did not come up: {e}"))
}

/// Negotiates 300 connections/s as soon as the edge can (bounded); the arrangement's id.
fn negotiate(bed: &FlashCrowd) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let outcome = bed.negotiate(300);
        if let Ok(view) = &outcome
            && view.state == p2pcdn_controller::admin::NegotiationState::Succeeded
        {
            return view.arrangements[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no successful negotiation within {WAIT:?}: {outcome:?}\n{}",
            bed.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `count` requests on new connections, 50 per second; `at_second` is called as each
/// second ends.
fn load(bed: &FlashCrowd, count: u32, mut at_second: impl FnMut(u64)) -> CrowdRun {
    let seconds = Duration::from_millis(u64::from(count) * 20);
    bed.run_load(bed.load_config(vec![Phase::new(50.0, seconds)]), |s| {
        at_second(s.bucket.second + 1);
    })
    .unwrap()
}

/// A request's start offset and what came of it: `Ok(true)` answered by the origin,
/// `Ok(false)` by someone else with the object's bytes, `Err` otherwise.
type Outcomes = Vec<(Duration, Result<bool, String>)>;

fn outcomes(bed: &FlashCrowd, run: &CrowdRun) -> Outcomes {
    let size = bed.config.body_bytes as u64;
    run.report
        .records
        .iter()
        .map(|r| {
            let o = match &r.outcome {
                Outcome::Ok { server, bytes } if *bytes == size => Ok(server == ORIGIN_NAME),
                Outcome::Ok { server, bytes } => {
                    Err(format!("{bytes} bytes from {server}, not {size}"))
                }
                Outcome::Failed { failure, server } => Err(format!("{failure:?} ({server:?})")),
            };
            (r.started, o)
        })
        .collect()
}

#[test]
fn a_negotiated_peer_serves_the_overflow_and_both_ledgers_agree() {
    if !require_netns_admin("a_negotiated_peer_serves_the_overflow_and_both_ledgers_agree") {
        return;
    }
    let bed = setup(false);
    let arrangement = negotiate(&bed);
    // 150 new connections at 50/s: the edge admits 10/s (burst 10), the rest is steered.
    let run = load(&bed, 150, |_| {});
    let outcomes: Vec<Result<bool, String>> =
        outcomes(&bed, &run).into_iter().map(|(_, o)| o).collect();
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    let by_peer = outcomes.iter().filter(|o| matches!(o, Ok(false))).count();
    let by_edge = outcomes.iter().filter(|o| matches!(o, Ok(true))).count();
    assert!(
        failures.is_empty(),
        "{} of 150 failed: {failures:?}\n{}",
        failures.len(),
        bed.logs()
    );
    assert!(
        by_peer > 0 && by_edge > 0,
        "edge {by_edge}, peer {by_peer}\n{}",
        bed.logs()
    );

    // Disband; both ledgers count the connections the peer answered.
    bed.disband(&arrangement, "test over").unwrap();
    let done =
        |rows: &[LedgerRow]| rows.len() == 1 && rows[0].state == "disbanded" && rows[0].peer_final;
    let deadline = Instant::now() + WAIT;
    let (mine, theirs) = loop {
        let mine = bed.edge_ledger().unwrap();
        let theirs = bed.peer_ledger("peer").unwrap();
        if done(&mine) && done(&theirs) {
            break (mine, theirs);
        }
        assert!(
            Instant::now() < deadline,
            "ledgers not final: {mine:?} {theirs:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let steered = mine[0].local_connections;
    let served = theirs[0].local_connections;
    eprintln!(
        "150 connections: {by_edge} answered by the edge, {by_peer} by the peer; ledgers: \
         edge {steered} steered, peer {served} served"
    );
    assert_eq!(
        served, by_peer as u64,
        "the peer counted what it answered: {theirs:?}"
    );
    assert_eq!(
        steered, served,
        "the edge's XDP count and the peer's surrogate count agree: {mine:?} {theirs:?}"
    );
    assert_eq!(mine[0].peer_connections, served);
    assert_eq!(mine[0].connections_discrepancy_percent, 0.0);
    bed.edge_redirector().run(&["detach"]).unwrap();
    bed.peer("peer")
        .unwrap()
        .redirector()
        .run(&["detach"])
        .unwrap();
}

#[test]
fn a_peer_killed_mid_crowd_gets_no_new_flows_and_the_crowd_is_still_served() {
    if !require_netns_admin(
        "a_peer_killed_mid_crowd_gets_no_new_flows_and_the_crowd_is_still_served",
    ) {
        return;
    }
    let bed = setup(false);
    negotiate(&bed);
    // 300 connections at 50/s (6 s); the peer dies 2 s in.
    let run = load(&bed, 300, |second| {
        if second == 2 {
            bed.kill_peer("peer").unwrap();
        }
    });
    let killed_at = bed
        .peer("peer")
        .unwrap()
        .killed_at()
        .unwrap()
        .duration_since(run.started);
    let outcomes = outcomes(&bed, &run);

    // The load's clock starts a little after `run.started`: a margin before the kill.
    let before: Vec<_> = outcomes
        .iter()
        .filter(|(at, _)| *at + Duration::from_millis(100) < killed_at)
        .collect();
    let after: Vec<_> = outcomes
        .iter()
        .filter(|(at, _)| *at >= killed_at + Duration::from_secs(1))
        .collect();
    assert!(
        before.iter().any(|(_, o)| matches!(o, Ok(false))),
        "the peer served before it died: {before:?}"
    );
    let wrong: Vec<_> = after
        .iter()
        .filter(|(_, o)| !matches!(o, Ok(true)))
        .collect();
    assert!(
        wrong.is_empty(),
        "a second after the kill every new connection is the edge's ({} of {}): {wrong:?}\n--- edge ---\n{}",
        wrong.len(),
        after.len(),
        bed.edge_log()
    );
    let failed_before: Vec<_> = before.iter().filter(|(_, o)| o.is_err()).collect();
    assert!(
        failed_before.is_empty(),
        "failures before the kill: {failed_before:?}"
    );
    let failed = outcomes.iter().filter(|(_, o)| o.is_err()).count();
    eprintln!(
        "300 connections, peer killed at {} ms: {failed} failed (all within the first second \
         after the kill), {} after +1 s all served by the edge",
        killed_at.as_millis(),
        after.len()
    );
    bed.edge_redirector().run(&["detach"]).unwrap();
}

#[test]
fn a_crowd_buys_capacity_by_itself_and_gives_it_back() {
    if !require_netns_admin("a_crowd_buys_capacity_by_itself_and_gives_it_back") {
        return;
    }
    let bed = setup(true);
    // 300 new connections at 50/s for a capacity of 10/s; nobody calls `negotiate`.
    let run = load(&bed, 300, |_| {});
    let outcomes = outcomes(&bed, &run);
    let failures: Vec<_> = outcomes.iter().filter(|(_, o)| o.is_err()).collect();
    assert!(
        failures.is_empty(),
        "every request is served (locally until peering starts): {failures:?}"
    );
    let first_by_peer = outcomes
        .iter()
        .find(|(_, o)| matches!(o, Ok(false)))
        .map(|(at, _)| *at)
        .unwrap_or_else(|| panic!("the monitor never brought a peer in\n{}", bed.logs()));
    let by_peer = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Ok(false)))
        .count();
    eprintln!(
        "crowd at 50/s for a capacity of 10/s: first answer by the peer {} ms after the \
         crowd began; {by_peer} of 300 answered by the peer",
        first_by_peer.as_millis()
    );

    // The crowd is over: after 2 s of calm the arrangement is drained and disbanded.
    let rows = bed
        .wait_ledger("the arrangement given back", WAIT, |rows| {
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| r.state == "disbanded" && r.end_reason.contains("low-water"))
        })
        .unwrap_or_else(|e| panic!("not given back: {e}"));
    let steered: u64 = rows.iter().map(|r| r.local_connections).sum();
    assert_eq!(steered, by_peer as u64, "{rows:?}");
    bed.edge_redirector().run(&["detach"]).unwrap();
    bed.peer("peer")
        .unwrap()
        .redirector()
        .run(&["detach"])
        .unwrap();
}
