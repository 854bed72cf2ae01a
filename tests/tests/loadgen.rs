//! The flash-crowd load generator, the capacity-limited origin and the run reports, on
//! loopback (unprivileged).
//!
//! No speed targets: the assertions are counts and orderings with wide margins, so a loaded
//! two-core machine does not make them flaky. One test builds a two-host netns testbed
//! (privileged; it fails under `CI=true` without privileges and skips elsewhere).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use p2pcdn_tests::{
    loadgen::{self, Bucket, Failure, LoadConfig, LoadError, LoadReport, PathPick, Phase},
    netns::Testbed,
    origin::{Origin, OriginConfig, OriginError},
    privilege::require_netns_admin,
    report::{self, ReportError, Run},
};

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn origin(config: OriginConfig) -> Origin {
    Origin::start(config).unwrap_or_else(|e| panic!("origin: {e}"))
}

fn target(origin: &Origin) -> SocketAddr {
    match origin.local_addrs().first() {
        Some(addr) => *addr,
        None => panic!("the origin has no address"),
    }
}

fn run(config: &LoadConfig) -> LoadReport {
    loadgen::run(config, |_| {}).unwrap_or_else(|e| panic!("load: {e}"))
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A TCP server on loopback that accepts connections and never answers (the kernel
/// completes the handshakes; nobody reads).
fn silent_server() -> TcpListener {
    TcpListener::bind(loopback()).unwrap_or_else(|e| panic!("bind: {e}"))
}

/// A raw HTTP server on loopback that answers up to `count` connections with `response`
/// (bounded in count and time).
fn raw_server(response: &'static str, count: usize) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind(loopback()).unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local addr: {e}"));
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("nonblocking: {e}"));
    let thread = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut served = 0;
        while served < count && Instant::now() < deadline {
            let Ok((mut stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            served += 1;
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (addr, thread)
}

/// The generator starts requests on schedule although the server is far slower: phases of
/// 20 and then 60 requests/s against a server that manages about 7/s.
#[test]
fn open_loop_holds_its_rate_against_a_slow_server() {
    let slow = origin(
        OriginConfig::new("slow", &[loopback()])
            .workers(2)
            .service_time(Duration::from_millis(300))
            .queue_limit(1000),
    );
    let config = LoadConfig::new(
        target(&slow),
        vec![Phase::new(20.0, secs(1.0)), Phase::new(60.0, secs(1.0))],
    )
    .timeout(secs(1.0));
    let live: Arc<Mutex<Vec<Bucket>>> = Arc::default();
    let report = {
        let live = Arc::clone(&live);
        loadgen::run(&config, move |b| {
            live.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(b.clone())
        })
        .unwrap_or_else(|e| panic!("load: {e}"))
    };

    // The schedule itself: 20 due in the first second, 60 in the second.
    assert_eq!(report.scheduled, 80);
    let due_first = report
        .records
        .iter()
        .filter(|r| r.scheduled < secs(1.0))
        .count();
    assert_eq!(due_first, 20, "requests due in the first second");
    // Every request started and got an outcome.
    assert_eq!(report.completed, 80);
    assert_eq!(report.records.len(), 80);
    // Started per second follows the schedule (wide margins for a busy machine), not the
    // server: a closed-loop client would have started about 7 a second.
    let started = report.started_per_second();
    let first = started.first().copied().unwrap_or(0);
    let second = started.get(1).copied().unwrap_or(0);
    assert!(
        (10..=30).contains(&first),
        "started in second 0: {started:?}"
    );
    assert!(second >= 30, "started in second 1: {started:?}");
    assert!(
        first + second >= 60,
        "most requests started within the 2 s schedule: {started:?}"
    );
    // Requests were in flight together far beyond what the server had answered.
    assert!(
        report.max_in_flight >= 20,
        "max in flight {}",
        report.max_in_flight
    );
    // The server answered some; the rest timed out (and nothing else went wrong).
    let timeouts = report.failures(Failure::Timeout);
    assert!(report.succeeded >= 1, "{report:?}");
    assert!(timeouts >= 20, "timeouts {timeouts}: {:?}", report.failed);
    assert_eq!(report.succeeded + timeouts, 80, "{:?}", report.failed);
    assert_eq!(report.served_by("slow"), report.succeeded);
    // Every started request is in exactly one second of the series.
    assert_eq!(report.series.iter().map(|b| b.started).sum::<u64>(), 80);
    assert_eq!(report.series.iter().map(|b| b.completed).sum::<u64>(), 80);
    // The live hook saw every second, in order, with the numbers of the final series.
    let live = live.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(live, report.series);
    for (i, b) in live.iter().enumerate() {
        assert_eq!(b.second, i as u64);
    }
}

/// With the in-flight cap reached, a due request fails at once as `overloaded_generator`
/// instead of waiting for a slot.
#[test]
fn in_flight_cap_counts_failures_instead_of_delaying() {
    let silent = silent_server();
    let addr = silent
        .local_addr()
        .unwrap_or_else(|e| panic!("local addr: {e}"));
    let timeout = secs(4.0);
    let config = LoadConfig::new(addr, vec![Phase::new(20.0, secs(1.0))])
        .timeout(timeout)
        .max_in_flight(5);
    let report = run(&config);
    assert_eq!(report.completed, 20);
    // The first five hold the slots until their timeout, long after the schedule.
    assert_eq!(report.failures(Failure::Timeout), 5, "{:?}", report.failed);
    assert_eq!(
        report.failures(Failure::OverloadedGenerator),
        15,
        "{:?}",
        report.failed
    );
    assert_eq!(report.max_in_flight, 5);
    for record in &report.records {
        match record.failure() {
            Some(Failure::OverloadedGenerator) => {
                // Not delayed until a slot freed up: refused before the first timeout.
                assert!(record.started < timeout, "{record:?}");
                assert_eq!(record.latency, Duration::ZERO);
            }
            Some(Failure::Timeout) => assert!(record.index < 5, "{record:?}"),
            other => panic!("unexpected outcome {other:?}: {record:?}"),
        }
    }
    drop(silent);
}

/// A server that never answers: every request is a timeout, none takes less than the
/// timeout, and the run still ends.
#[test]
fn timeouts_are_counted() {
    let silent = silent_server();
    let addr = silent
        .local_addr()
        .unwrap_or_else(|e| panic!("local addr: {e}"));
    let timeout = secs(0.3);
    let config = LoadConfig::new(addr, vec![Phase::new(20.0, secs(0.5))]).timeout(timeout);
    let report = run(&config);
    assert_eq!(report.scheduled, 10);
    assert_eq!(report.failures(Failure::Timeout), 10, "{:?}", report.failed);
    assert_eq!(report.succeeded, 0);
    assert_eq!(report.success_rate, 0.0);
    assert!(report.records.iter().all(|r| r.latency >= timeout));
    assert_eq!(report.latency.p99_ms, None, "no successes, no latency");
    drop(silent);
}

/// The answering server is read from `x-served-by` (any case), or from the configured
/// header; "unknown" without one.
#[test]
fn server_attribution_from_the_header() {
    let alpha = origin(OriginConfig::new("alpha", &[loopback()]));
    let schedule = vec![Phase::new(50.0, secs(0.2))];
    let report = run(&LoadConfig::new(target(&alpha), schedule.clone()));
    assert_eq!(report.succeeded, 10);
    assert_eq!(report.served_by("alpha"), 10);
    assert_eq!(report.servers.len(), 1, "{:?}", report.servers);
    let per_second: u64 = report
        .series
        .iter()
        .map(|b| b.by_server.get("alpha").copied().unwrap_or(0))
        .sum();
    assert_eq!(per_second, 10);

    // Another header name: the origin's answers are not attributed.
    let report = run(&LoadConfig::new(target(&alpha), schedule.clone()).served_by_header("x-node"));
    assert_eq!(report.served_by(loadgen::UNKNOWN_SERVER), 10);
    assert_eq!(report.served_by("alpha"), 0);

    let (plain, plain_thread) = raw_server(
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi",
        10,
    );
    let report = run(&LoadConfig::new(plain, schedule.clone()));
    assert_eq!(report.served_by(loadgen::UNKNOWN_SERVER), 10, "{report:?}");
    let (gamma, gamma_thread) = raw_server(
        "HTTP/1.1 200 OK\r\nX-Served-By: gamma\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi",
        10,
    );
    let report = run(&LoadConfig::new(gamma, schedule));
    assert_eq!(report.served_by("gamma"), 10, "{report:?}");
    assert_eq!(report.servers.get("gamma").map(|s| s.bytes), Some(20));
    let _ = plain_thread.join();
    let _ = gamma_thread.join();
}

/// Round-robin asks for every path in turn; Zipf favours the first paths, in order.
#[test]
fn paths_round_robin_and_zipf() {
    let paths = ["/a", "/b", "/c", "/d"];
    let mut config = OriginConfig::new("objects", &[loopback()])
        .service_time(Duration::ZERO)
        .workers(64);
    for (i, p) in paths.iter().enumerate() {
        config = config.object(p, vec![b'x'; 100 * (i + 1)]);
    }
    let objects = origin(config);
    let schedule = vec![Phase::new(100.0, secs(1.2))];
    let count = |report: &LoadReport| {
        let mut counts = [0u64; 4];
        for r in &report.records {
            assert!(r.is_ok(), "{r:?}");
            if let Some(c) = counts.get_mut(r.path) {
                *c += 1;
            }
        }
        counts
    };
    let report =
        run(&LoadConfig::new(target(&objects), schedule.clone())
            .paths(&paths, PathPick::RoundRobin));
    assert_eq!(count(&report), [30, 30, 30, 30]);
    // Bytes tell the objects apart: 30 × (100 + 200 + 300 + 400).
    assert_eq!(report.servers.get("objects").map(|s| s.bytes), Some(30_000));

    let report = run(&LoadConfig::new(target(&objects), schedule)
        .paths(&paths, PathPick::Zipf { exponent: 1.0 }));
    let counts = count(&report);
    assert_eq!(counts.iter().sum::<u64>(), 120);
    assert!(
        counts.windows(2).all(|w| w[0] > w[1]),
        "Zipf counts not decreasing: {counts:?}"
    );
    // Weights 1, 1/2, 1/3, 1/4 of 120 are 57.6, 28.8, 19.2, 14.4.
    assert!((50..=65).contains(&counts[0]), "{counts:?}");
    assert_eq!(objects.stats().served, 240);
}

/// Beyond its workers the origin queues (latency climbs), beyond the queue it answers 503;
/// the generator's view and the origin's counters agree.
#[test]
fn origin_capacity_limit_queues_then_rejects() {
    let service_time = Duration::from_millis(100);
    let limited = origin(
        OriginConfig::new("edge", &[loopback()])
            .workers(2)
            .service_time(service_time)
            .queue_limit(4)
            .status_path("/status"),
    );
    // 40 requests within 0.2 s against a capacity of 20/s.
    let config =
        LoadConfig::new(target(&limited), vec![Phase::new(200.0, secs(0.2))]).timeout(secs(10.0));
    let report = run(&config);
    let stats = limited.stats();
    assert_eq!(report.completed, 40);
    let rejected = report.failures(Failure::Status(503));
    // Two workers and four queued at least are served; most of the burst is refused.
    assert!(report.succeeded >= 6, "{report:?}");
    assert!(rejected >= 5, "{:?}", report.failed);
    assert_eq!(report.succeeded + rejected, 40, "{:?}", report.failed);
    // The queue filled up to its limit, never beyond.
    assert_eq!(stats.max_queued, 4, "{stats:?}");
    assert_eq!(stats.served, report.succeeded);
    assert_eq!(stats.rejected, rejected);
    assert_eq!(stats.requests, 40);
    assert_eq!(stats.in_service + stats.queued, 0, "idle after the run");
    // The 503s are the origin's own answers.
    let edge = report.servers.get("edge").cloned().unwrap_or_default();
    assert_eq!(edge.errors, rejected);
    assert_eq!(edge.served, report.succeeded);
    // Queueing shows in latency: every success took the service time, and the last two
    // of a full queue waited for two rounds of service (FIFO: the two ahead of them took
    // the first workers to free up).
    let ok: Vec<Duration> = report
        .records
        .iter()
        .filter(|r| r.is_ok())
        .map(|r| r.latency)
        .collect();
    assert!(ok.iter().all(|l| *l >= service_time), "{ok:?}");
    assert!(
        ok.iter().filter(|l| **l >= service_time * 2).count() >= 2,
        "queued requests waited: {ok:?}"
    );
    let max_ms = report.latency.max_ms.unwrap_or(0.0);
    assert!(max_ms >= 200.0, "max latency {max_ms} ms");

    // The status page (nginx stub_status format) reports the same counts, outside the
    // capacity limit.
    let mut stream =
        std::net::TcpStream::connect(target(&limited)).unwrap_or_else(|e| panic!("connect: {e}"));
    stream
        .write_all(b"GET /status HTTP/1.1\r\nhost: edge\r\nconnection: close\r\n\r\n")
        .unwrap_or_else(|e| panic!("write: {e}"));
    let mut page = String::new();
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    stream
        .read_to_string(&mut page)
        .unwrap_or_else(|e| panic!("read: {e}"));
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("server accepts handled requests\n 41 41 41 \n"),
        "{page}"
    );
    assert!(page.contains("Writing: 0 Waiting: 0"), "{page}");
}

/// The SVG names every series and run; the JSON holds both runs; the table lists them.
#[test]
fn report_writes_svg_json_and_table() {
    let edge = origin(
        OriginConfig::new("edge", &[loopback()])
            .workers(1)
            .service_time(Duration::from_millis(100))
            .queue_limit(0),
    );
    let peer = origin(OriginConfig::new("peer1", &[loopback()]));
    let schedule = vec![Phase::new(40.0, secs(0.5))];
    let without = run(&LoadConfig::new(target(&edge), schedule.clone()));
    let with = run(&LoadConfig::new(target(&peer), schedule));
    assert!(
        without.failures(Failure::Status(503)) > 0,
        "{:?}",
        without.failed
    );
    assert_eq!(with.served_by("peer1"), 20);
    let runs = [
        Run::new("without peering", &without),
        Run::new("with peering", &with),
    ];

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let svg_path = dir.path().join("plots/loadtest.svg");
    report::write_svg(&svg_path, &runs).unwrap_or_else(|e| panic!("svg: {e}"));
    let svg = std::fs::read_to_string(&svg_path).unwrap_or_else(|e| panic!("read svg: {e}"));
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    for name in [
        "edge",
        "peer1",
        report::FAILED_SERIES,
        report::OFFERED_SERIES,
        report::SUCCESS_SERIES,
        report::P50_SERIES,
        report::P99_SERIES,
        "without peering: requests/s by server",
        "with peering: latency of successes",
    ] {
        assert!(svg.contains(name), "the SVG does not name {name:?}");
    }
    assert!(svg.contains("<polyline"), "no lines drawn");

    let json_path = dir.path().join("loadtest.json");
    report::write_json(&json_path, &runs).unwrap_or_else(|e| panic!("json: {e}"));
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&json_path).unwrap_or_else(|e| panic!("read json: {e}")),
    )
    .unwrap_or_else(|e| panic!("parse json: {e}"));
    assert_eq!(json["runs"][0]["label"], "without peering");
    assert_eq!(json["runs"][1]["report"]["succeeded"], 20);
    assert_eq!(json["runs"][1]["report"]["servers"]["peer1"]["served"], 20);
    assert!(json["runs"][0]["report"]["failed"]["status_503"].as_u64() > Some(0));
    assert!(
        json["runs"][1]["report"]["series"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    );

    let table = report::summary_table(&runs);
    assert!(table.contains("without peering") && table.contains("with peering"));
    assert!(table.contains("peer1=20"), "{table}");
    assert!(table.contains("status_503="), "{table}");
    let line = report::live_line(&with.series[0]);
    assert!(line.contains("peer1"), "{line}");

    // Bad report input.
    assert!(matches!(
        report::write_svg(&svg_path, &[]),
        Err(ReportError::NoRuns)
    ));
    let dup = [Run::new("a", &with), Run::new("a", &without)];
    assert!(matches!(
        report::write_json(&json_path, &dup),
        Err(ReportError::DuplicateLabel(_))
    ));
}

/// Bad schedules, paths and limits are refused before anything is sent, with a message
/// naming the problem.
#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let addr = SocketAddr::from(([127, 0, 0, 1], 9));
    let one = vec![Phase::new(10.0, secs(1.0))];
    let cases: Vec<(LoadConfig, &str)> = vec![
        (LoadConfig::new(addr, vec![]), "schedule is empty"),
        (
            LoadConfig::new(addr, vec![Phase::new(0.0, secs(1.0))]),
            "rate 0 req/s",
        ),
        (
            LoadConfig::new(addr, vec![Phase::new(f64::NAN, secs(1.0))]),
            "not a positive",
        ),
        (
            LoadConfig::new(addr, vec![Phase::new(-5.0, secs(1.0))]),
            "not a positive",
        ),
        (
            LoadConfig::new(
                addr,
                vec![
                    Phase::new(10.0, secs(1.0)),
                    Phase::new(10.0, Duration::ZERO),
                ],
            ),
            "phase 1: the duration is zero",
        ),
        (
            LoadConfig::new(addr, vec![Phase::new(1e7, secs(10.0))]),
            "at most",
        ),
        (
            LoadConfig::new(addr, one.clone()).paths::<&str>(&[], PathPick::RoundRobin),
            "path list is empty",
        ),
        (
            LoadConfig::new(addr, one.clone()).paths(&["index.html"], PathPick::RoundRobin),
            "\"index.html\"",
        ),
        (
            LoadConfig::new(addr, one.clone()).paths(&["/"], PathPick::Zipf { exponent: -1.0 }),
            "Zipf exponent -1",
        ),
        (
            LoadConfig::new(addr, one.clone()).max_in_flight(0),
            "in-flight cap",
        ),
        (
            LoadConfig::new(addr, one.clone()).timeout(Duration::ZERO),
            "timeout",
        ),
        (
            LoadConfig::new(addr, one.clone()).host("bad\nhost"),
            "Host header",
        ),
        (
            LoadConfig::new(addr, one.clone()).served_by_header("bad header"),
            "header name",
        ),
    ];
    for (config, expected) in cases {
        let err = match loadgen::run(&config, |_| {}) {
            Err(e) => e,
            Ok(report) => panic!("{config:?} was accepted: {report:?}"),
        };
        let text = err.to_string();
        assert!(
            text.contains(expected),
            "{text:?} does not say {expected:?}"
        );
        assert!(!text.contains('\n'), "not one line: {text:?}");
        assert!(config.validate().is_err());
    }
    assert!(matches!(
        LoadConfig::new(addr, vec![]).validate(),
        Err(LoadError::EmptySchedule)
    ));

    let origin_cases: Vec<(OriginConfig, &str)> = vec![
        (
            OriginConfig::new("edge", &[]),
            "at least one listening address",
        ),
        (
            OriginConfig::new("edge", &[loopback()]).workers(0),
            "at least one worker",
        ),
        (OriginConfig::new("", &[loopback()]), "origin name"),
        (
            OriginConfig::new("edge", &[loopback()]).object("x", "y"),
            "must start with '/'",
        ),
    ];
    for (config, expected) in origin_cases {
        let err = match Origin::start(config) {
            Err(e) => e,
            Ok(o) => panic!("origin {} started", o.name),
        };
        assert!(
            err.to_string().contains(expected),
            "{err} does not say {expected:?}"
        );
    }
    // A namespace that does not exist is an error for both.
    let missing = "p2p-no-such-namespace";
    assert!(matches!(
        loadgen::run_in(missing, LoadConfig::new(addr, one), |_| {}),
        Err(LoadError::Netns(_))
    ));
    assert!(matches!(
        Origin::start_in(missing, OriginConfig::new("edge", &[loopback()])),
        Err(OriginError::Netns(_))
    ));
    // A taken address is a bind error, not a panic.
    let taken = origin(OriginConfig::new("edge", &[loopback()]));
    assert!(matches!(
        Origin::start(OriginConfig::new("edge", &[target(&taken)])),
        Err(OriginError::Bind { .. })
    ));
}

/// The generator and the origin in two namespaces of a testbed: the load runs from the
/// client's namespace to the origin's address in the other one, and every answer is the
/// origin's.
#[test]
fn runs_between_namespaces() {
    if !require_netns_admin("runs_between_namespaces") {
        return;
    }
    let testbed = Testbed::builder()
        .host("client")
        .host("origin")
        .build()
        .unwrap_or_else(|e| panic!("testbed: {e}"));
    let origin_host = testbed.host("origin").clone();
    let addr = SocketAddr::new(origin_host.v4.into(), 80);
    let server = Origin::start_in(&origin_host.ns, OriginConfig::new("origin", &[addr]))
        .unwrap_or_else(|e| panic!("origin: {e}"));
    assert_eq!(server.local_addrs(), [addr]);
    let seconds: Arc<Mutex<Vec<u64>>> = Arc::default();
    let report = {
        let seconds = Arc::clone(&seconds);
        loadgen::run_in(
            &testbed.host("client").ns,
            LoadConfig::new(addr, vec![Phase::new(40.0, secs(1.5))]),
            move |b| {
                seconds
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(b.second)
            },
        )
        .unwrap_or_else(|e| panic!("load: {e}"))
    };
    assert_eq!(report.succeeded, 60, "{:?}", report.failed);
    assert_eq!(report.served_by("origin"), 60);
    assert_eq!(server.stats().accepted, 60);
    let seconds = seconds.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(seconds, (0..report.series.len() as u64).collect::<Vec<_>>());
}
