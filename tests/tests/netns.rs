//! Network-namespace integration tests: the real `p2pcdn-redirector` CLI and XDP program
//! between a client, an edge and peer servers on one bridged segment.
//!
//! Privileged (root, or CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN); they fail under `CI=true`
//! without privileges. They share kernel state (bpffs, module settings), so each takes a
//! lock and they run one at a time even without `--test-threads=1`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use p2pcdn_tests::{
    http::{Client, LoadPlan, Server},
    netns::{Testbed, netns_path},
    privilege::require_netns_admin,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The testbed itself, without XDP: a client reaches a server's loopback service address
/// through a route, over IPv4 and IPv6, keep-alive connections carry later requests, and
/// every namespace is gone after drop.
#[test]
fn testbed_carries_http_and_is_torn_down() {
    if !require_netns_admin("testbed_carries_http_and_is_torn_down") {
        return;
    }
    let _serial = serial();
    let service = Ipv4Addr::new(10, 99, 100, 1);
    let testbed = Testbed::builder()
        .host("client")
        .host_with_loopback("server", &[IpAddr::V4(service)])
        .build()
        .unwrap_or_else(|e| panic!("testbed: {e}"));
    let namespaces: Vec<String> = testbed
        .hosts
        .iter()
        .map(|h| h.ns.clone())
        .chain([testbed.switch_ns.clone()])
        .collect();
    for ns in &namespaces {
        assert!(netns_path(ns).exists(), "{ns} missing");
    }
    let server_host = testbed.host("server").clone();
    testbed
        .route("client", "10.99.100.1/32", server_host.v4.into())
        .unwrap_or_else(|e| panic!("route: {e}"));
    {
        let server = Server::start(
            &server_host.ns,
            "server",
            &[
                SocketAddr::new(service.into(), 80),
                SocketAddr::new(server_host.v6.into(), 80),
            ],
        )
        .unwrap_or_else(|e| panic!("server: {e}"));
        let client =
            Client::start(&testbed.host("client").ns).unwrap_or_else(|e| panic!("client: {e}"));

        let plan = LoadPlan::new(
            SocketAddr::new(service.into(), 80),
            40,
            Duration::from_millis(400),
        )
        .keep_per_server(3);
        let mut seen = 0;
        let report = client
            .load(plan, |_| seen += 1)
            .unwrap_or_else(|e| panic!("load: {e}"));
        assert_eq!(seen, 40, "progress reported every connection");
        assert!(report.errors().is_empty(), "errors: {:?}", report.errors());
        assert_eq!(report.count("server"), 40);
        assert_eq!(server.accepted(), 40);
        assert!(
            report.elapsed >= Duration::from_millis(390),
            "open loop paced over 400 ms, took {:?}",
            report.elapsed
        );

        let kept = report.kept();
        assert_eq!(kept.len(), 3, "{kept:?}");
        let ids: Vec<_> = kept.iter().map(|(id, _)| *id).collect();
        let again = client
            .reuse(&ids, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("reuse: {e}"));
        assert!(
            again.iter().all(|o| o.result.as_deref() == Ok("server")),
            "{again:?}"
        );
        assert_eq!(server.accepted(), 40, "reuses opened no connection");
        assert_eq!(server.requests(), 43);

        let v6 = client
            .load(
                LoadPlan::new(
                    SocketAddr::new(server_host.v6.into(), 80),
                    10,
                    Duration::from_millis(100),
                ),
                |_| {},
            )
            .unwrap_or_else(|e| panic!("load: {e}"));
        assert_eq!(v6.count("server"), 10, "{:?}", v6.errors());

        // Nothing but the testbed is reachable: no default route.
        let unreachable = client
            .load(
                LoadPlan::new(
                    "10.99.200.1:80".parse().unwrap_or_else(|e| panic!("{e}")),
                    1,
                    Duration::ZERO,
                ),
                |_| {},
            )
            .unwrap_or_else(|e| panic!("load: {e}"));
        let error = unreachable.errors().first().map(|o| o.result.clone());
        assert!(
            matches!(&error, Some(Err(e)) if e.contains("unreachable")),
            "{error:?}"
        );
    }
    drop(testbed);
    for ns in &namespaces {
        assert!(!netns_path(ns).exists(), "{ns} left behind");
    }
}
