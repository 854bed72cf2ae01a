//! The data plane follows the arrangements: two real daemons (mutual TLS, gossip, SQLite), each
//! with an in-memory data plane (the redirector's map logic without the kernel), the provider
//! with a real surrogate on loopback, and an origin web server that serves the primary's
//! signed manifest and files.
//!
//! Activation makes the primary steer to the provider (a peer with the agreed rate and
//! encapsulation, for the arrangement's service only) and the provider allow the primary's
//! tunnel source and serve the primary's content on the service address; disbanding undoes
//! all of it. A provider that cannot verify the primary's manifest refuses the activation and
//! keeps nothing.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::get};
use p2pcdn_controller::{
    accounting,
    admin::{NegotiateRequest, NegotiationState},
    daemon::{self, Drain, LoadEvent, Node, Options, testbed},
    health::ProbeSettings,
    identity::NodeIdentity,
    manifest::{self, BuildOptions},
    model::{Role, now_ms},
    steering::{SharedDataplane, SteeringSettings, peer_name},
    store::{ArrangementFilter, ArrangementRecord},
    surrogate::{Surrogate, SurrogateConfig},
};
use redirector_user::{Dataplane, Encap, MemoryDataplane, PeerServices, ServiceSpec};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const WAIT: Duration = Duration::from_secs(15);
const PRIMARY_TUNNEL_SOURCE: &str = "192.0.2.2";
const PROVIDER_DECAP: &str = "192.0.2.1";
const HOST: &str = "shop.test";
const PAGE: &[u8] = b"<!doctype html><title>shop</title><p>flash sale</p>\n";

async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("not within {WAIT:?}: {what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A loopback address of its own per test, for the service (the provider's surrogate listens
/// on it, as it would on the service address on `lo`).
fn service_addr(n: u8) -> SocketAddr {
    let port = std::net::TcpListener::bind((IpAddr::from([127, 0, 0, n]), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    SocketAddr::new(IpAddr::from([127, 0, 0, n]), port)
}

/// The origin: `/manifest` (the signed manifest bytes) and the files by path.
async fn start_origin(files: HashMap<String, Bytes>, manifest: Arc<Mutex<Bytes>>) -> SocketAddr {
    #[derive(Clone)]
    struct Origin {
        files: Arc<HashMap<String, Bytes>>,
        manifest: Arc<Mutex<Bytes>>,
    }
    async fn serve(State(o): State<Origin>, uri: axum::http::Uri) -> Result<Bytes, StatusCode> {
        if uri.path() == "/manifest" {
            return Ok(o.manifest.lock().unwrap().clone());
        }
        o.files
            .get(uri.path())
            .cloned()
            .ok_or(StatusCode::NOT_FOUND)
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(get(serve)).with_state(Origin {
        files: Arc::new(files),
        manifest,
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// An in-memory data plane the daemon drives, and a handle on the same maps through which the
/// test plays the kernel's part (counting packets).
fn memory_dataplane() -> (SharedDataplane, Arc<Mutex<MemoryDataplane>>) {
    let mem = Arc::new(Mutex::new(MemoryDataplane::new(
        Some("192.0.2.254".parse().unwrap()),
        None,
    )));
    let dp: Box<dyn Dataplane + Send> = Box::new(Kernel(mem.clone()));
    (Arc::new(Mutex::new(dp)), mem)
}

/// [`MemoryDataplane`] shared with the test.
struct Kernel(Arc<Mutex<MemoryDataplane>>);

impl Kernel {
    fn with<T>(&self, f: impl FnOnce(&mut MemoryDataplane) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }
}

impl Dataplane for Kernel {
    fn config(&self) -> redirector_user::Result<redirector_user::ConfigSpec> {
        self.with(|d| d.config())
    }
    fn set_config(&mut self, c: &redirector_user::ConfigSpec) -> redirector_user::Result<()> {
        self.with(|d| d.set_config(c))
    }
    fn upsert_service(&mut self, spec: &ServiceSpec) -> redirector_user::Result<u32> {
        self.with(|d| d.upsert_service(spec))
    }
    fn remove_service(&mut self, name: &str) -> redirector_user::Result<()> {
        self.with(|d| d.remove_service(name))
    }
    fn services(&self) -> redirector_user::Result<Vec<redirector_user::ServiceInfo>> {
        self.with(|d| d.services())
    }
    fn set_peer(&mut self, spec: &redirector_user::PeerSpec) -> redirector_user::Result<u32> {
        self.with(|d| d.set_peer(spec))
    }
    fn remove_peer(&mut self, name: &str) -> redirector_user::Result<()> {
        self.with(|d| d.remove_peer(name))
    }
    fn peers(&self) -> redirector_user::Result<Vec<redirector_user::PeerInfo>> {
        self.with(|d| d.peers())
    }
    fn allow_decap(&mut self, addr: IpAddr) -> redirector_user::Result<bool> {
        self.with(|d| d.allow_decap(addr))
    }
    fn deny_decap(&mut self, addr: IpAddr) -> redirector_user::Result<bool> {
        self.with(|d| d.deny_decap(addr))
    }
    fn decap_allowed(&self) -> redirector_user::Result<Vec<IpAddr>> {
        self.with(|d| d.decap_allowed())
    }
    fn decap_stats(&self) -> redirector_user::Result<Vec<redirector_user::DecapCounters>> {
        self.with(|d| d.decap_stats())
    }
    fn stats(&self) -> redirector_user::Result<redirector_user::Stats> {
        self.with(|d| d.stats())
    }
}

/// One HTTP/1.1 GET over a fresh connection; (status, body).
async fn http_get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| "read timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let body = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| buf[i + 4..].to_vec())
        .unwrap_or_default();
    Ok((status, body))
}

struct Pair {
    _dir: tempfile::TempDir,
    primary: Node,
    provider: Node,
    primary_dp: SharedDataplane,
    primary_kernel: Arc<Mutex<MemoryDataplane>>,
    provider_dp: SharedDataplane,
    provider_kernel: Arc<Mutex<MemoryDataplane>>,
    surrogate: Surrogate,
    service: SocketAddr,
    provider_config: std::path::PathBuf,
}

/// Starts the provider and the primary; `sign_with_other_key` makes the manifest the origin
/// serves one the primary did not sign.
async fn start_pair(n: u8, sign_with_other_key: bool) -> Pair {
    start_pair_with(n, sign_with_other_key, None, None).await
}

/// [`start_pair`], the two sides sharing long-term agreement "lt-standby" of `standby`
/// new connections/s that the primary keeps on standby.
/// `surrogate_url`: what the provider advertises as its surrogate (default none).
async fn start_pair_with(
    n: u8,
    sign_with_other_key: bool,
    standby: Option<u32>,
    surrogate_url: Option<String>,
) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let service = service_addr(n);
    let manifest_bytes = Arc::new(Mutex::new(Bytes::new()));
    let files = HashMap::from([
        ("/index.html".to_owned(), Bytes::from_static(PAGE)),
        ("/app.js".to_owned(), Bytes::from(vec![b'x'; 20_000])),
    ]);
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    for (path, bytes) in &files {
        std::fs::write(content.join(path.trim_start_matches('/')), bytes).unwrap();
    }
    let origin = start_origin(files, manifest_bytes.clone()).await;

    let discovery =
        "[discovery]\ngossip_interval_ms = 100\nsuspect_after_ms = 5000\ndead_after_ms = 15000\n";
    // The primary's identity first: the provider's agreement names it. Its seed (the
    // provider's gossip address) is filled in once the provider runs.
    let mut primary_prep = testbed::prepare(
        &dir.path().join("edge"),
        "edge",
        &[],
        &format!(
            "{discovery}[resources]\ndecap_v4 = \"{PRIMARY_TUNNEL_SOURCE}\"\n\
             [[services]]\nname = \"web\"\naddresses = [\"{service}\"]\nhost_names = [\"{HOST}\"]\n\
             manifest_url = \"http://{origin}/manifest\"\nduration_s = 600\n"
        ),
    )
    .unwrap();
    let agreement = |peer: &p2pcdn_controller::model::Fingerprint, role: &str, rate: u32| {
        format!(
            "[[policy.long_term]]\nagreement_id = \"lt-standby\"\npeer = \"{peer}\"\n\
             role = \"{role}\"\nnew_connections_per_s = {rate}\nduration_s = 600\n{}",
            if role == "primary" {
                "standby = true\n"
            } else {
                ""
            }
        )
    };
    let provider_overlay = match standby {
        Some(rate) => agreement(&primary_prep.fingerprint, "provider", rate),
        None => String::new(),
    };
    let provider_prep = testbed::prepare(
        &dir.path().join("peer"),
        "peer",
        &[],
        &format!(
            "{discovery}[resources]\ndecap_v4 = \"{PROVIDER_DECAP}\"\n{}{provider_overlay}",
            surrogate_url
                .map(|u| format!("surrogate_url = \"{u}\"\n"))
                .unwrap_or_default()
        ),
    )
    .unwrap();
    let (provider_dp, provider_kernel) = memory_dataplane();
    let surrogate = Surrogate::new(SurrogateConfig::new(dir.path().join("cache")))
        .await
        .unwrap();
    let settings = SteeringSettings {
        manage_loopback: false,
        ..SteeringSettings::default()
    };
    let provider = daemon::start(
        provider_prep.config.clone(),
        Options {
            dataplane: Some(provider_dp.clone()),
            surrogate: Some(surrogate.clone()),
            steering: settings.clone(),
            ..Options::default()
        },
    )
    .await
    .unwrap();

    if let Some(rate) = standby {
        let mut text = std::fs::read_to_string(&primary_prep.config_path).unwrap();
        text.push_str(&agreement(&provider.fingerprint(), "primary", rate));
        std::fs::write(&primary_prep.config_path, text).unwrap();
        primary_prep.config =
            p2pcdn_controller::config::Config::load(&primary_prep.config_path).unwrap();
    }
    primary_prep.config.discovery.seeds = vec![provider.gossip_addr().to_string()];
    // The primary signs its manifest with its node key (another key: a forged manifest).
    let signer = if sign_with_other_key {
        NodeIdentity::generate("forger", "Forgers", &["localhost".to_owned()]).unwrap()
    } else {
        NodeIdentity::load(
            &primary_prep.dir.join("node.key"),
            &primary_prep.dir.join("node.crt"),
        )
        .unwrap()
    };
    let mut opts = BuildOptions::new(primary_prep.fingerprint, "web", &format!("http://{origin}"));
    opts.now = now_ms();
    let mut m = manifest::build_from_dir(&content, opts).await.unwrap();
    m.set_hot(vec!["/index.html".to_owned()]);
    *manifest_bytes.lock().unwrap() = Bytes::from(manifest::sign(&signer, &m).encode());

    let (primary_dp, primary_kernel) = memory_dataplane();
    primary_dp
        .lock()
        .unwrap()
        .upsert_service(&ServiceSpec::new("web", vec![service], 100))
        .unwrap();
    let primary = daemon::start(
        primary_prep.config.clone(),
        Options {
            dataplane: Some(primary_dp.clone()),
            steering: settings,
            drain: Drain {
                quiet: Duration::from_millis(300),
                max: Duration::from_secs(5),
                poll: Duration::from_millis(50),
            },
            probes: ProbeSettings {
                grace: Duration::from_secs(1),
                ..ProbeSettings::default()
            },
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let provider_fp = provider.fingerprint();
    eventually("the primary knows the provider's advert", || async {
        if primary
            .registry()
            .candidates(now_ms())
            .iter()
            .any(|c| c.fingerprint == provider_fp)
        {
            Ok(())
        } else {
            Err("not yet".to_owned())
        }
    })
    .await;
    Pair {
        _dir: dir,
        primary,
        provider,
        primary_dp,
        primary_kernel,
        provider_dp,
        provider_kernel,
        surrogate,
        service,
        provider_config: provider_prep.config_path.clone(),
    }
}

fn arrangements(node: &Node, role: Role) -> Vec<ArrangementRecord> {
    node.store()
        .arrangements(&ArrangementFilter {
            role: Some(role),
            ..ArrangementFilter::default()
        })
        .unwrap()
}

async fn negotiate(node: &Node, conn: u64) -> p2pcdn_controller::admin::NegotiationView {
    tokio::time::timeout(
        WAIT,
        node.backend().negotiate(NegotiateRequest {
            service: "web".to_owned(),
            new_connections_per_s: Some(conn),
            duration_s: None,
        }),
    )
    .await
    .unwrap()
    .unwrap()
}

/// Each arrangement's state and end reason, for failure messages.
fn reasons(node: &Node) -> Vec<(String, Option<String>)> {
    node.store()
        .arrangements(&ArrangementFilter::default())
        .unwrap()
        .into_iter()
        .map(|a| (format!("{:?}", a.state), a.end_reason))
        .collect()
}

fn decap_allowed(dp: &SharedDataplane) -> Vec<IpAddr> {
    dp.lock().unwrap().decap_allowed().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_active_arrangement_is_steered_served_and_undone() {
    let pair = start_pair(61, false).await;
    let outcome = negotiate(&pair.primary, 300).await;
    assert_eq!(
        outcome.state,
        NegotiationState::Succeeded,
        "{outcome:?}\nprimary: {:?}\nprovider: {:?}",
        reasons(&pair.primary),
        reasons(&pair.provider)
    );
    let mine = arrangements(&pair.primary, Role::Primary)
        .into_iter()
        .find(|a| a.state == p2pcdn_controller::proto::pb::ArrangementState::Active)
        .expect("an active primary arrangement");
    let theirs = arrangements(&pair.provider, Role::Provider)
        .into_iter()
        .find(|a| a.state == p2pcdn_controller::proto::pb::ArrangementState::Active)
        .expect("an active provider arrangement");

    // The primary steers to the provider: its decap address, the agreed rate, this service.
    let peers = pair.primary_dp.lock().unwrap().peers().unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    let peer = &peers[0];
    let granted = mine
        .terms
        .as_ref()
        .and_then(|t| t.granted.as_ref())
        .map(|g| g.new_connections_per_s)
        .unwrap();
    assert_eq!(peer.name, peer_name(&mine.id));
    assert_eq!(peer.addr, PROVIDER_DECAP.parse::<IpAddr>().unwrap());
    assert_eq!(peer.rate, Some(granted));
    assert!(peer.weight > 0, "{peer:?}");
    assert_eq!(
        peer.encap,
        Encap::Gue,
        "the provider's preferred mode is GUE"
    );
    assert_eq!(peer.services, PeerServices::Only(vec!["web".to_owned()]));

    // The provider accepts the primary's tunnels and serves its content on the service address.
    assert_eq!(
        decap_allowed(&pair.provider_dp),
        vec![PRIMARY_TUNNEL_SOURCE.parse::<IpAddr>().unwrap()]
    );
    assert_eq!(pair.surrogate.tenants(), vec![theirs.id.clone()]);
    let (status, body) = http_get(pair.service, HOST, "/index.html").await.unwrap();
    assert_eq!((status, body.as_slice()), (200, PAGE));
    let (status, _) = http_get(pair.service, HOST, "/not-in-the-manifest")
        .await
        .unwrap();
    assert_eq!(
        status, 404,
        "objects outside the manifest are never fetched"
    );
    let (status, _) = http_get(pair.service, "other.test", "/index.html")
        .await
        .unwrap();
    assert_ne!(status, 200, "another host is not the primary's");
    eventually("the hot set is prepositioned", || async {
        let usage = pair.surrogate.usage(&theirs.id).ok_or("no usage")?;
        if usage.origin_fetches >= 1 {
            Ok(())
        } else {
            Err(format!("{usage:?}"))
        }
    })
    .await;

    // The kernels' part: the primary tunnels packets to the provider, which decapsulates the
    // same packets (and the same inner bytes) from the primary's tunnel source.
    let slot = peer.slot;
    pair.primary_kernel
        .lock()
        .unwrap()
        .add_peer_stats(slot, 1, |s| {
            s.connections += 2;
            s.packets += 14;
            s.bytes += 9_876;
        });
    assert!(pair.provider_kernel.lock().unwrap().add_decap_stats(
        PRIMARY_TUNNEL_SOURCE.parse().unwrap(),
        0,
        |s| {
            s.pkts += 14;
            s.bytes += 9_876;
        }
    ));

    // Draining: no new flows (weight 0), the peer stays configured for the established ones.
    pair.primary.steering().unwrap().drain(&mine).unwrap();
    let drained = pair.primary_dp.lock().unwrap().peers().unwrap();
    assert_eq!(drained.len(), 1, "{drained:?}");
    assert_eq!(drained[0].weight, 0, "{drained:?}");
    assert_eq!(drained[0].rate, Some(granted), "{drained:?}");

    // Retiring (the crowd is over): drained, then disbanded; undone on both sides.
    let drain = Drain {
        quiet: Duration::from_millis(300),
        max: Duration::from_secs(5),
        poll: Duration::from_millis(50),
    };
    let started = Instant::now();
    let ended = pair
        .primary
        .retire_service("web", "load below the low-water mark", drain)
        .await
        .unwrap();
    assert!(
        started.elapsed() >= drain.quiet,
        "it waited for the flows to go quiet"
    );
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].id, mine.id);
    assert_eq!(
        ended[0].state,
        p2pcdn_controller::proto::pb::ArrangementState::Disbanded
    );
    assert!(
        ended[0]
            .end_reason
            .as_deref()
            .is_some_and(|r| r.contains("low-water")),
        "{ended:?}"
    );
    eventually("the primary's peer is removed", || async {
        let peers = pair.primary_dp.lock().unwrap().peers().unwrap();
        if peers.is_empty() {
            Ok(())
        } else {
            Err(format!("{peers:?}"))
        }
    })
    .await;
    eventually("the provider forgets the primary", || async {
        let allowed = decap_allowed(&pair.provider_dp);
        if allowed.is_empty() && pair.surrogate.tenants().is_empty() {
            Ok(())
        } else {
            Err(format!(
                "decap {allowed:?}, tenants {:?}",
                pair.surrogate.tenants()
            ))
        }
    })
    .await;
    eventually("the service address is closed", || async {
        match http_get(pair.service, HOST, "/index.html").await {
            Err(e) if e.contains("refused") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Accounting: the provider counted the two requests routed to the arrangement, and has
    // the primary's final count; the ledger export shows both.
    let rows = eventually("the provider's ledger row is final", || async {
        let rows = accounting::ledger(pair.provider.store(), None).map_err(|e| e.to_string())?;
        match rows.as_slice() {
            [row] if row.peer_final && row.local_final && row.state == "disbanded" => Ok(rows),
            _ => Err(format!("{rows:?}")),
        }
    })
    .await;
    assert_eq!(rows[0].arrangement, theirs.id);
    assert_eq!(rows[0].role, "provider");
    assert_eq!(rows[0].local_connections, 2, "{:?}", rows[0]);
    assert_eq!(
        (rows[0].local_packets, rows[0].local_bytes),
        (14, 9_876),
        "the provider counts what it decapsulated from the primary: {:?}",
        rows[0]
    );
    assert_eq!(
        (
            rows[0].peer_connections,
            rows[0].peer_packets,
            rows[0].peer_bytes
        ),
        (2, 14, 9_876),
        "the primary's count of what it tunnelled: {:?}",
        rows[0]
    );
    assert!(
        rows[0].bytes_discrepancy_percent.abs() < f64::EPSILON,
        "{:?}",
        rows[0]
    );
    assert_eq!(rows[0].service, "web");
    pair.primary.shutdown().await;
    pair.provider.shutdown().await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_p2pcdn"))
        .args(["ledger", "export", "--format", "csv", "--config"])
        .arg(&pair.provider_config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8(out.stdout).unwrap();
    let mut lines = csv.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("arrangement,role,peer,service")
    );
    let line = lines.next().unwrap();
    assert!(
        line.starts_with(&format!("{},provider,", theirs.id)),
        "{csv}"
    );
    assert_eq!(lines.next(), None, "{csv}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_p2pcdn"))
        .args(["ledger", "export", "--arrangement", "a-none", "--config"])
        .arg(&pair.provider_config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("a-none"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_the_primary_did_not_sign_refuses_the_activation_and_keeps_nothing() {
    let pair = start_pair(62, true).await;
    let outcome = negotiate(&pair.primary, 300).await;
    assert_ne!(outcome.state, NegotiationState::Succeeded, "{outcome:?}");
    assert!(pair.primary_dp.lock().unwrap().peers().unwrap().is_empty());
    assert!(decap_allowed(&pair.provider_dp).is_empty());
    assert!(pair.surrogate.tenants().is_empty());
    let ended = arrangements(&pair.provider, Role::Provider);
    assert!(
        ended.iter().any(|a| a
            .end_reason
            .as_deref()
            .is_some_and(|r| r.contains("manifest"))),
        "the provider records why: {:?}",
        ended.iter().map(|a| &a.end_reason).collect::<Vec<_>>()
    );
    assert!(
        http_get(pair.service, HOST, "/index.html").await.is_err(),
        "nothing listens on the service address"
    );
    pair.primary.shutdown().await;
    pair.provider.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_events_negotiate_on_overload_and_retire_on_recovery() {
    let pair = start_pair(63, false).await;
    let events = pair.primary.load_events();
    events
        .send(LoadEvent::Overloaded {
            service: "web".to_owned(),
            deficit_conn_per_s: 240,
            reason: "arrivals at 150 % of capacity".to_owned(),
        })
        .await
        .unwrap();
    let peer = eventually("the overload is covered by a steered provider", || async {
        let peers = pair.primary_dp.lock().unwrap().peers().unwrap();
        match peers.as_slice() {
            [p] => Ok(p.clone()),
            _ => Err(format!(
                "peers {peers:?}; negotiations {:?}",
                pair.primary.store().negotiations(10).unwrap()
            )),
        }
    })
    .await;
    assert_eq!(
        peer.rate,
        Some(240),
        "the deficit is what is asked for: {peer:?}"
    );
    assert_eq!(pair.surrogate.tenants().len(), 1);

    events
        .send(LoadEvent::Recovered {
            service: "web".to_owned(),
        })
        .await
        .unwrap();
    eventually("the crowd is over: drained and disbanded", || async {
        let peers = pair.primary_dp.lock().unwrap().peers().unwrap();
        let ended = arrangements(&pair.primary, Role::Primary);
        let disbanded = ended.iter().any(|a| {
            a.state == p2pcdn_controller::proto::pb::ArrangementState::Disbanded
                && a.end_reason
                    .as_deref()
                    .is_some_and(|r| r.contains("low-water"))
        });
        if peers.is_empty() && disbanded && pair.surrogate.tenants().is_empty() {
            Ok(())
        } else {
            Err(format!("peers {peers:?}, arrangements {ended:?}"))
        }
    })
    .await;
    pair.primary.shutdown().await;
    pair.provider.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_that_dies_gets_no_new_flows_and_is_disbanded_for_the_breach() {
    let pair = start_pair(64, false).await;
    let outcome = negotiate(&pair.primary, 300).await;
    assert_eq!(
        outcome.state,
        NegotiationState::Succeeded,
        "{outcome:?}\nprimary: {:?}\nprovider: {:?}",
        reasons(&pair.primary),
        reasons(&pair.provider)
    );
    let peers = pair.primary_dp.lock().unwrap().peers().unwrap();
    assert!(peers.len() == 1 && peers[0].weight > 0, "{peers:?}");
    let id = outcome.arrangements[0].clone();

    pair.provider.shutdown().await;
    let died = Instant::now();
    eventually("the dead provider leaves the Maglev table", || async {
        let peers = pair.primary_dp.lock().unwrap().peers().unwrap();
        match peers.as_slice() {
            [p] if p.weight == 0 => Ok(()),
            _ => Err(format!("{peers:?}")),
        }
    })
    .await;
    eprintln!(
        "weight 0 after {} ms (defaults: 2 failed probes 250 ms apart, 300 ms timeout)",
        died.elapsed().as_millis()
    );
    let ended = eventually("the breach ends the arrangement", || async {
        let a = pair.primary.store().arrangement(&id).unwrap().unwrap();
        if a.state == p2pcdn_controller::proto::pb::ArrangementState::Disbanded {
            Ok(a)
        } else {
            Err(format!("{:?}", a.state))
        }
    })
    .await;
    assert!(
        ended
            .end_reason
            .as_deref()
            .is_some_and(|r| r.contains("probes failing")),
        "{ended:?}"
    );
    assert!(pair.primary_dp.lock().unwrap().peers().unwrap().is_empty());
    pair.primary.shutdown().await;
}

#[test]
fn peer_names_fit_the_data_plane() {
    let long = format!("a-{}", "0123456789abcdef".repeat(4));
    let name = peer_name(&long);
    assert!(name.len() <= 31, "{name}");
    assert!(redirector_user::validate_name(&name).is_ok(), "{name}");
    assert_eq!(peer_name(&long), name, "stable");
    assert_eq!(peer_name("a-1"), "a-1");
}

/// A standby long-term peer is in the data plane before any crowd (the kernel steers overflow
/// to it at once); an overload it covers negotiates nothing more; the crowd's end disbands it
/// with its accounting, and the keeper arms a fresh arrangement for the next crowd.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_long_term_peer_is_steered_to_before_the_crowd_and_rearmed_after_it() {
    let pair = start_pair_with(63, false, Some(400), None).await;
    let first = eventually(
        "the standby peer is armed without any load event",
        || async {
            let active: Vec<ArrangementRecord> = arrangements(&pair.primary, Role::Primary)
                .into_iter()
                .filter(|a| a.state == p2pcdn_controller::proto::pb::ArrangementState::Active)
                .collect();
            let peers = pair.primary_dp.lock().unwrap().peers().unwrap();
            match (active.as_slice(), peers.as_slice()) {
                ([a], [p]) if p.weight > 0 && p.name == peer_name(&a.id) => Ok(a.clone()),
                _ => Err(format!("active {active:?}, peers {peers:?}")),
            }
        },
    )
    .await;
    assert_eq!(first.agreement_id.as_deref(), Some("lt-standby"));
    let peers = pair.primary_dp.lock().unwrap().peers().unwrap();
    assert_eq!(peers[0].rate, Some(400), "{peers:?}");

    // An overload within the standby's capacity: covered already, nothing else negotiated.
    pair.primary
        .load_events()
        .send(LoadEvent::Overloaded {
            service: "web".to_owned(),
            deficit_conn_per_s: 300,
            reason: "test".to_owned(),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let all = arrangements(&pair.primary, Role::Primary);
    assert_eq!(
        all.len(),
        1,
        "nothing negotiated beyond the standby: {all:?}"
    );

    // The crowd is over: the standby arrangement is retired with a ledger row, then a new
    // one is armed.
    pair.primary
        .load_events()
        .send(LoadEvent::Recovered {
            service: "web".to_owned(),
        })
        .await
        .unwrap();
    let second = eventually("retired, then armed again", || async {
        let all = arrangements(&pair.primary, Role::Primary);
        let old = all.iter().find(|a| a.id == first.id).ok_or("gone")?;
        let fresh = all.iter().find(|a| {
            a.id != first.id && a.state == p2pcdn_controller::proto::pb::ArrangementState::Active
        });
        match (old.state, fresh) {
            (p2pcdn_controller::proto::pb::ArrangementState::Disbanded, Some(f)) => Ok(f.clone()),
            _ => Err(format!("{all:?}")),
        }
    })
    .await;
    assert_eq!(second.agreement_id.as_deref(), Some("lt-standby"));
    let rows = accounting::ledger(pair.primary.store(), Some(&first.id)).unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].state, "disbanded", "{rows:?}");
    assert!(rows[0].end_reason.contains("low-water"), "{rows:?}");
    assert!(
        rows[0].local_final,
        "the primary's last count is final: {rows:?}"
    );
    let peers = pair.primary_dp.lock().unwrap().peers().unwrap();
    assert_eq!(
        peers.len(),
        1,
        "only the fresh arrangement's peer: {peers:?}"
    );
    assert_eq!(peers[0].name, peer_name(&second.id));
    pair.primary.shutdown().await;
    pair.provider.shutdown().await;
}

/// A dishonest provider: the surrogate it advertises is a proxy in front of its real one that
/// flips a byte of every object (what clients would get over DSR from a peer that tampers with the
/// primary's content). The primary's content samples catch it: the provider leaves the Maglev
/// table, its arrangement is terminated for cause with the agreed penalty in full, and the
/// decision and its evidence are in `p2pcdn peers --json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_serving_corrupted_bytes_is_isolated_and_terminated_for_cause() {
    // The tampering proxy forwards to the provider's surrogate (the service address, known
    // once the pair runs) with the primary's Host.
    let upstream: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let up = upstream.clone();
    let app = Router::new().fallback(get(move |uri: axum::http::Uri| {
        let up = up.clone();
        async move {
            let Some(addr) = *up.lock().unwrap() else {
                return (StatusCode::SERVICE_UNAVAILABLE, Vec::new());
            };
            match http_get(addr, HOST, uri.path()).await {
                Ok((200, mut body)) => {
                    if let Some(b) = body.get_mut(10) {
                        *b ^= 0x20;
                    }
                    (StatusCode::OK, body)
                }
                Ok((status, body)) => (StatusCode::from_u16(status).unwrap(), body),
                Err(_) => (StatusCode::BAD_GATEWAY, Vec::new()),
            }
        }
    }));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let pair = start_pair_with(65, false, None, Some(format!("http://{proxy}"))).await;
    *upstream.lock().unwrap() = Some(pair.service);
    let outcome = negotiate(&pair.primary, 300).await;
    assert_eq!(outcome.state, NegotiationState::Succeeded, "{outcome:?}");
    let mine = arrangements(&pair.primary, Role::Primary)
        .into_iter()
        .find(|a| a.state == p2pcdn_controller::proto::pb::ArrangementState::Active)
        .expect("an active primary arrangement");

    // Steered traffic, as the kernel counts it, so that the arrangement has charges.
    let slot = pair.primary_dp.lock().unwrap().peers().unwrap()[0].slot;
    pair.primary_kernel
        .lock()
        .unwrap()
        .add_peer_stats(slot, 0, |s| {
            s.connections += 5_000;
            s.packets += 60_000;
            s.bytes += 3_000_000_000;
        });

    // Sampled (idle providers are sampled every few seconds): a corrupted /app.js is caught.
    let ended = eventually("the dishonest provider is terminated for cause", || async {
        let a = arrangements(&pair.primary, Role::Primary)
            .into_iter()
            .find(|a| a.id == mine.id)
            .ok_or("gone")?;
        match a.state {
            p2pcdn_controller::proto::pb::ArrangementState::Disbanded => Ok(a),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let reason = ended.end_reason.clone().unwrap_or_default();
    assert!(reason.contains("DISHONEST"), "{reason}");
    assert!(
        reason.contains("/app.js") || reason.contains("/index.html"),
        "the evidence names the sample: {reason}"
    );
    let peers = pair.primary_dp.lock().unwrap().peers().unwrap();
    assert!(peers.is_empty(), "out of the Maglev table: {peers:?}");
    let settlement = ended.settlement.clone().unwrap_or_default();
    let max_credit = mine
        .terms
        .as_ref()
        .and_then(|t| t.penalties)
        .map_or(0, |p| p.max_credit_percent)
        .min(100);
    assert!(settlement.charges_micros > 0, "{settlement:?}");
    assert_eq!(
        settlement.credit_micros,
        settlement.charges_micros * u64::from(max_credit) / 100,
        "the agreed penalty in full ({max_credit} %): {settlement:?}"
    );

    // Excluded from negotiation while isolated.
    let again = negotiate(&pair.primary, 300).await;
    assert_ne!(again.state, NegotiationState::Succeeded, "{again:?}");

    // The decision and its evidence are visible to operators.
    let peers = pair.primary.backend().peers().await.unwrap();
    let view = peers
        .iter()
        .find(|p| p.fingerprint == pair.provider.fingerprint())
        .expect("the provider is listed");
    let assessment = serde_json::to_value(view).unwrap();
    let text = assessment.to_string();
    assert!(
        text.contains("isolated") || text.contains("Isolated"),
        "{text}"
    );
    assert!(
        text.contains("/app.js") || text.contains("/index.html"),
        "evidence in peers --json: {text}"
    );
    pair.primary.shutdown().await;
    pair.provider.shutdown().await;
}
