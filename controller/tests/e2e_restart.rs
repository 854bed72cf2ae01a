//! The `p2pcdn run` process across crashes and restarts, against in-process providers on
//! loopback.
//!
//! - kill -9 of the primary while it negotiates (one candidate is a black hole that accepts
//!   TCP and never answers, so the negotiation stays open for seconds), and again right after
//!   an arrangement became active on a provider: the store it leaves passes its checks, the
//!   restarted daemon abandons the interrupted negotiation, leaves no half-done primary
//!   arrangement, and every arrangement a provider activated ends up active on both sides or
//!   ended on both sides;
//! - a restart (SIGTERM, then `run` again) re-confirms an active arrangement with a heartbeat
//!   and keeps it on both sides; one whose end time passed while the primary was down is
//!   disbanded on both sides;
//! - a bad config (key file, unknown key, bad address) exits 64 with one line before anything
//!   binds: the config's ports are held by the test while it runs, so a daemon that bound
//!   first would fail with "address in use" instead;
//! - SIGTERM stops the daemon with status 0 within a bound and frees its ports.
//!
//! The primary is a child process with fixed ports (picked by binding port 0); providers run
//! in this test's runtime (`daemon::start`). Every wait is bounded and says what was missing;
//! the child is killed when its guard drops.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

use std::{
    fs::{self, OpenOptions},
    io::Write,
    net::{SocketAddr, TcpListener as StdTcpListener, UdpSocket},
    os::unix::{fs::PermissionsExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::http::{Method, StatusCode};
use p2pcdn_controller::{
    admin::{AdminClient, LivenessView, NegotiationState, NegotiationView, PeerView, StatusView},
    daemon::{self, Node, Options, testbed},
    identity::NodeIdentity,
    model::{Fingerprint, Role, now_ms},
    peering_agent::ArrangementHooks,
    proto::pb,
    store::{
        ArrangementFilter, ArrangementRecord, NegotiationState as StoredNegotiation, Store,
        UsageKind, UsageSource,
    },
};
use serde::de::DeserializeOwned;
use tokio::{net::TcpListener, task::JoinHandle};

type State = pb::ArrangementState;

/// Bound of every wait for something that should happen promptly.
const WAIT: Duration = Duration::from_secs(15);
/// Bound for both sides of every arrangement to agree after a restart.
const SETTLE: Duration = Duration::from_secs(20);
/// Bound for `p2pcdn run` to exit after SIGTERM.
const EXIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// The primary's service, in its overlay.
const SERVICE: &str = "web";

/// The daemon tests start several nodes each and time kills against negotiation steps: one at
/// a time keeps them reliable on a small, loaded machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ------------------------------------------------------------------------------- ports

/// Fixed loopback ports for a child daemon, free when picked.
#[derive(Debug, Clone, Copy)]
struct Ports {
    control: u16,
    admin: u16,
    gossip: u16,
}

impl Ports {
    fn pick() -> Self {
        let tcp = || {
            StdTcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (control, admin) = (tcp(), tcp());
        let gossip = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self {
            control,
            admin,
            gossip,
        }
    }

    fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin))
    }

    fn overlay(&self) -> String {
        format!(
            "[node]\nlisten = \"127.0.0.1:{}\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n\
             [discovery]\ngossip_listen = \"127.0.0.1:{}\"\n",
            self.control, self.admin, self.gossip
        )
    }

    /// Binds all three, as a daemon would; holding them makes a daemon's bind fail.
    fn hold(&self) -> Result<(StdTcpListener, StdTcpListener, UdpSocket), String> {
        let what = |kind: &'static str, port: u16| {
            move |e: std::io::Error| format!("{kind} port {port}: {e}")
        };
        Ok((
            StdTcpListener::bind(("127.0.0.1", self.control))
                .map_err(what("control (tcp)", self.control))?,
            StdTcpListener::bind(("127.0.0.1", self.admin))
                .map_err(what("admin (tcp)", self.admin))?,
            UdpSocket::bind(("127.0.0.1", self.gossip))
                .map_err(what("gossip (udp)", self.gossip))?,
        ))
    }

    fn assert_free(&self, context: &str) {
        if let Err(e) = self.hold() {
            panic!("{context}: a configured port is still bound: {e}");
        }
    }
}

// ------------------------------------------------------------------------ child daemon

/// `p2pcdn run --config …` as a child process; killed (SIGKILL) when dropped.
struct Daemon {
    prepared: testbed::Prepared,
    log: PathBuf,
    child: Option<Child>,
    runs: u32,
}

impl Daemon {
    fn new(prepared: testbed::Prepared) -> Self {
        let log = prepared.dir.join("daemon.log");
        Self {
            prepared,
            log,
            child: None,
            runs: 0,
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon is already running");
        self.runs += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(log, "===== p2pcdn run #{}", self.runs).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_p2pcdn"))
            .arg("run")
            .arg("--config")
            .arg(&self.prepared.config_path)
            .env_remove("P2PCDN_CONFIG")
            .env_remove("P2PCDN_TOKEN")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon is not running").id()
    }

    /// The daemon's log (all runs), for failure messages.
    fn log(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        // The end is what explains a failure; keep messages readable.
        let start = text.len().saturating_sub(12_000);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        format!(
            "--- daemon log ({}) ---\n{}",
            self.log.display(),
            &text[start..]
        )
    }

    /// Panics with the log if the process has exited.
    fn assert_running(&mut self, context: &str) {
        let child = self.child.as_mut().expect("the daemon is not running");
        if let Some(status) = child.try_wait().unwrap() {
            self.child = None;
            panic!(
                "{context}: p2pcdn run exited early ({status})\n{}",
                self.log()
            );
        }
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("the daemon is not running");
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "not killed by SIGKILL: {status}");
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    async fn terminate(&mut self) -> (ExitStatus, Duration) {
        let pid = self.pid().to_string();
        let sent = Instant::now();
        let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(kill.success(), "kill -TERM {pid} failed: {kill}");
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return (status, sent.elapsed());
            }
            if sent.elapsed() > EXIT {
                panic!(
                    "p2pcdn run did not exit within {EXIT:?} of SIGTERM\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn admin(&self, timeout: Duration) -> AdminClient {
        AdminClient::new(
            self.prepared.config.admin.listen,
            self.prepared.cert_der.clone(),
            Some(self.prepared.operator_token.clone()),
            None,
            timeout,
        )
        .unwrap()
    }

    /// Waits until the admin API answers `/v1/status` (the daemon has recovered and bound
    /// everything); panics if the process exits first.
    async fn wait_ready(&mut self) -> StatusView {
        let admin = self.admin(Duration::from_secs(3));
        let deadline = Instant::now() + WAIT;
        loop {
            self.assert_running("waiting for the admin api");
            let last = match get::<StatusView>(&admin, "/v1/status").await {
                Ok(status) => return status,
                Err(e) => e,
            };
            if Instant::now() > deadline {
                panic!(
                    "the admin api at {} did not answer within {WAIT:?}: {last}\n{}",
                    admin.addr(),
                    self.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn store_path(&self) -> PathBuf {
        self.prepared.config.store_path()
    }

    /// A copy of the store as the stopped (or killed) process left it, opened: the copy runs
    /// SQLite's recovery of the write-ahead log, as the next start would.
    fn stopped_store_copy(&self, name: &str) -> Store {
        assert!(
            self.child.is_none(),
            "copy the store of a stopped daemon only"
        );
        let dir = self.prepared.dir.join(name);
        fs::create_dir_all(&dir).unwrap();
        let db = self.store_path();
        let copy = dir.join("p2pcdn.db");
        fs::copy(&db, &copy).unwrap();
        let wal = db.with_extension("db-wal");
        if wal.exists() {
            fs::copy(&wal, dir.join("p2pcdn.db-wal")).unwrap();
        }
        Store::open(&copy).unwrap_or_else(|e| panic!("the store left behind does not open: {e}"))
    }

    /// The live store of the running daemon (SQLite WAL allows a second connection).
    fn live_store(&self) -> Store {
        Store::open(&self.store_path()).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn get<T: DeserializeOwned>(admin: &AdminClient, path: &str) -> Result<T, String> {
    let (status, body) = admin
        .request(Method::GET, path, None)
        .await
        .map_err(|e| e.to_string())?;
    if status != StatusCode::OK {
        return Err(format!(
            "GET {path}: {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET {path}: {e}"))
}

// --------------------------------------------------------------------------- cluster

/// A TCP listener that accepts connections and never answers (a peer that hangs).
struct BlackHole {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl BlackHole {
    async fn open() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                // Bounded: a negotiation opens one connection per ask.
                if held.len() < 64 {
                    held.push(stream);
                }
            }
        });
        Self { addr, task }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// In-process providers (and optionally a black-hole candidate) and the primary as a child.
struct Cluster {
    providers: Vec<Node>,
    /// A node whose advertised control endpoint is the black hole.
    decoy: Option<(Node, BlackHole)>,
    primary: Daemon,
    // Last: the directories outlive the nodes and the child.
    _dir: tempfile::TempDir,
}

struct ClusterSpec {
    providers: usize,
    black_hole: bool,
    /// The data-plane hooks of provider 0 (default: log only).
    first_provider_hooks: Option<Arc<dyn ArrangementHooks>>,
    /// Extra TOML for the primary (its `[[services]]` entry at least).
    primary_overlay: String,
}

impl Cluster {
    async fn start(spec: ClusterSpec) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut providers = Vec::new();
        for i in 0..spec.providers {
            let name = format!("provider-{i}");
            let p = testbed::prepare(&dir.path().join(&name), &name, &[], "").unwrap();
            let mut options = Options::default();
            if let (0, Some(hooks)) = (i, &spec.first_provider_hooks) {
                options.hooks = hooks.clone();
            }
            providers.push(daemon::start(p.config, options).await.unwrap());
        }
        let decoy = if spec.black_hole {
            let hole = BlackHole::open().await;
            let overlay = format!("[node]\nadvertise_control = \"{}\"\n", hole.addr);
            let p = testbed::prepare(&dir.path().join("decoy"), "decoy", &[], &overlay).unwrap();
            let node = daemon::start(p.config, Options::default()).await.unwrap();
            Some((node, hole))
        } else {
            None
        };
        let seeds: Vec<SocketAddr> = providers
            .iter()
            .chain(decoy.as_ref().map(|(n, _)| n))
            .map(Node::gossip_addr)
            .collect();
        let ports = Ports::pick();
        let overlay = format!("{}{}", ports.overlay(), spec.primary_overlay);
        let prepared =
            testbed::prepare(&dir.path().join("primary"), "primary", &seeds, &overlay).unwrap();
        assert_eq!(prepared.config.admin.listen, ports.admin_addr());
        let mut primary = Daemon::new(prepared);
        primary.spawn();
        primary.wait_ready().await;
        let cluster = Self {
            providers,
            decoy,
            primary,
            _dir: dir,
        };
        cluster.wait_primary_knows_everyone().await;
        cluster
    }

    fn primary_fp(&self) -> Fingerprint {
        self.primary.prepared.fingerprint
    }

    fn candidate_fps(&self) -> Vec<Fingerprint> {
        self.providers
            .iter()
            .chain(self.decoy.as_ref().map(|(n, _)| n))
            .map(Node::fingerprint)
            .collect()
    }

    /// Until the primary has a live advert of every provider (and of the decoy).
    async fn wait_primary_knows_everyone(&self) {
        let admin = self.primary.admin(Duration::from_secs(3));
        let wanted = self.candidate_fps();
        let deadline = Instant::now() + WAIT;
        loop {
            let peers = get::<Vec<PeerView>>(&admin, "/v1/peers").await;
            let missing: Vec<String> = match &peers {
                Ok(peers) => wanted
                    .iter()
                    .filter(|fp| {
                        !peers.iter().any(|p| {
                            p.fingerprint == **fp
                                && p.liveness == LivenessView::Alive
                                && p.advert_sequence.is_some()
                        })
                    })
                    .map(|fp| fp.short().to_string())
                    .collect(),
                Err(e) => vec![e.clone()],
            };
            if missing.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the primary did not learn live adverts of {missing:?} within {WAIT:?} \
                     (peers: {peers:?})\n{}",
                    self.primary.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts `POST /v1/negotiate` in the background (it runs to the negotiation's end).
    fn negotiate(&self, conn_per_s: u64) -> JoinHandle<Result<NegotiationView, String>> {
        let admin = self.primary.admin(Duration::from_secs(60));
        tokio::spawn(async move {
            let body = serde_json::json!({
                "service": SERVICE,
                "new_connections_per_s": conn_per_s,
            });
            let (status, bytes) = admin
                .request(Method::POST, "/v1/negotiate", Some(&body))
                .await
                .map_err(|e| e.to_string())?;
            if status != StatusCode::OK {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
            }
            serde_json::from_slice(&bytes).map_err(|e| e.to_string())
        })
    }

    /// Every arrangement a provider holds with the primary.
    fn provider_records(&self) -> Vec<(usize, ArrangementRecord)> {
        let primary = self.primary_fp();
        let mut all = Vec::new();
        for (i, node) in self.providers.iter().enumerate() {
            let records = node
                .store()
                .arrangements(&ArrangementFilter {
                    role: Some(Role::Provider),
                    peer: Some(primary),
                    ..ArrangementFilter::default()
                })
                .unwrap();
            all.extend(records.into_iter().map(|r| (i, r)));
        }
        all
    }

    /// Whether both sides agree on every arrangement: none half-done on the primary, every
    /// arrangement a provider activated active on both sides or ended on both sides, every
    /// active primary arrangement active at its provider.
    fn agreement(&self, primary: &Store) -> Result<(), String> {
        let mine = primary
            .arrangements(&ArrangementFilter {
                role: Some(Role::Primary),
                ..ArrangementFilter::default()
            })
            .map_err(|e| e.to_string())?;
        let theirs = self.provider_records();
        let mut problems = Vec::new();
        for p in &mine {
            if matches!(p.state, State::Requested | State::Offered | State::Accepted) {
                problems.push(format!("primary {} is still {:?}", p.id, p.state));
            }
        }
        let provider_fp = |i: usize| self.providers[i].fingerprint();
        let counterpart = |i: usize, q: &ArrangementRecord| {
            mine.iter()
                .find(|p| p.peer == provider_fp(i) && p.peer_ref.as_deref() == Some(&q.id))
        };
        for (i, q) in &theirs {
            if q.activated_ms.is_none() && q.state != State::Active {
                continue;
            }
            let p = counterpart(*i, q);
            // Active on both sides, or ended on both (the primary may never have recorded
            // it, or cancelled it before it heard of the activation).
            let ok = matches!(
                (p.map(|p| p.state), q.state),
                (Some(State::Active), State::Active)
                    | (
                        None | Some(State::Disbanded | State::Cancelled),
                        State::Disbanded
                    )
            );
            if !ok {
                problems.push(format!(
                    "provider-{i} {} is {:?} (ended: {:?}) but the primary has {}",
                    q.id,
                    q.state,
                    q.end_reason,
                    p.map_or("nothing".to_owned(), |p| format!(
                        "{} {:?} (ended: {:?})",
                        p.id, p.state, p.end_reason
                    ))
                ));
            }
        }
        for p in mine.iter().filter(|p| p.state == State::Active) {
            let at_provider = theirs
                .iter()
                .find(|(i, q)| provider_fp(*i) == p.peer && p.peer_ref.as_deref() == Some(&q.id));
            if at_provider.is_none_or(|(_, q)| q.state != State::Active) {
                problems.push(format!(
                    "primary {} is active but its provider has {:?}",
                    p.id,
                    at_provider.map(|(_, q)| (q.state, q.end_reason.clone()))
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Polls [`Cluster::agreement`] until it holds (bounded by [`SETTLE`]).
    async fn wait_settled(&mut self, context: &str) {
        let store = self.primary.live_store();
        let deadline = Instant::now() + SETTLE;
        loop {
            self.primary.assert_running(context);
            match self.agreement(&store) {
                Ok(()) => return,
                Err(problems) if Instant::now() > deadline => panic!(
                    "{context}: the two sides did not settle within {SETTLE:?}: {problems}\n{}",
                    self.primary.log()
                ),
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    async fn shutdown(self) {
        let Self {
            providers,
            decoy,
            mut primary,
            _dir,
        } = self;
        if primary.child.is_some() {
            let (status, _) = primary.terminate().await;
            assert!(status.success(), "{status}\n{}", primary.log());
        }
        for node in providers {
            node.shutdown().await;
        }
        if let Some((node, _hole)) = decoy {
            node.shutdown().await;
        }
    }
}

fn summary(records: &[(usize, ArrangementRecord)]) -> Vec<String> {
    records
        .iter()
        .map(|(i, r)| format!("provider-{i} {} {:?}", r.id, r.state))
        .collect()
}

fn service_overlay(duration_s: u64, extra_policy: &str) -> String {
    format!(
        "[policy]\n{extra_policy}\n[[services]]\nname = \"{SERVICE}\"\n\
         addresses = [\"192.0.2.80:80\"]\nduration_s = {duration_s}\n"
    )
}

/// What the primary's store looked like when the process died.
struct LeftBehind {
    running: Vec<String>,
}

fn check_left_behind(primary: &Daemon, name: &str) -> LeftBehind {
    let store = primary.stopped_store_copy(name);
    let report = store
        .verify()
        .unwrap_or_else(|e| panic!("the store left by kill -9 fails its checks: {e}"));
    eprintln!("{name}: the store left behind passes its checks: {report:?}");
    let running = store
        .unfinished_negotiations()
        .unwrap()
        .into_iter()
        .map(|n| n.request_id)
        .collect();
    LeftBehind { running }
}

/// After a restart: every negotiation the kill interrupted is `abandoned` and none runs.
async fn assert_abandoned(primary: &Daemon, left: &LeftBehind) {
    let admin = primary.admin(Duration::from_secs(3));
    let list = get::<Vec<NegotiationView>>(&admin, "/v1/negotiations")
        .await
        .unwrap();
    for id in &left.running {
        let n = list
            .iter()
            .find(|n| &n.request_id == id)
            .unwrap_or_else(|| {
                panic!("negotiation {id} is not listed after the restart: {list:?}")
            });
        assert_eq!(
            n.state,
            NegotiationState::Abandoned,
            "interrupted negotiation {id} after the restart: {n:?}"
        );
        assert!(n.ended_ms.is_some(), "{n:?}");
    }
    assert!(
        list.iter().all(|n| n.state != NegotiationState::Running),
        "a negotiation still runs after the restart: {list:?}"
    );
    let stored = primary.live_store();
    for id in &left.running {
        let n = stored.negotiation(id).unwrap().unwrap();
        assert_eq!(n.state, StoredNegotiation::Abandoned, "{n:?}");
    }
    let status = get::<StatusView>(&admin, "/v1/status").await.unwrap();
    assert_eq!(status.negotiations_running, 0, "{status:?}");
}

// ----------------------------------------------------------------------- kill -9 tests

/// Both providers are needed (each offers half its 1000 conn/s).
const NEEDED_CONN_PER_S: u64 = 800;

/// A data plane that is slow to install the first arrangement: the provider has recorded it
/// active but has not answered the primary's Activate yet. Blocks (bounded) until released.
#[derive(Debug, Default)]
struct StallFirstActivation {
    used: AtomicBool,
    entered: AtomicBool,
    release: AtomicBool,
}

impl StallFirstActivation {
    const MAX_STALL: Duration = Duration::from_secs(5);
}

impl ArrangementHooks for StallFirstActivation {
    fn activated(&self, _: &ArrangementRecord) -> Result<(), String> {
        if !self.used.swap(true, Ordering::SeqCst) {
            self.entered.store(true, Ordering::SeqCst);
            let since = Instant::now();
            // A blocking data-plane call, as a map update is; the test runtime has spare
            // worker threads for it.
            while !self.release.load(Ordering::SeqCst) && since.elapsed() < Self::MAX_STALL {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }

    fn ended(&self, _: &ArrangementRecord) {}
}

/// When the primary is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// As soon as the store shows the negotiation running.
    Started,
    /// Both providers have made their offers; the black hole still holds the round open.
    OffersPending,
    /// Provider 0 has the arrangement active but has not answered Activate yet.
    ProviderActivating,
    /// The negotiation finished: both sides active.
    Concluded,
}

/// kill -9 of the primary at `moment` of a negotiation over two providers and a black hole;
/// restart; the store and both sides settle.
async fn kill_9_and_restart(moment: Moment) {
    let _serial = SERIAL.lock().await;
    let stall = Arc::new(StallFirstActivation::default());
    let mut cluster = Cluster::start(ClusterSpec {
        providers: 2,
        black_hole: true,
        first_provider_hooks: (moment == Moment::ProviderActivating)
            .then(|| stall.clone() as Arc<dyn ArrangementHooks>),
        // The black hole must be among the candidates asked (three candidates, k = 3): it
        // holds the round of offers open until the timeout.
        primary_overlay: service_overlay(600, "negotiation_timeout_ms = 3000\ncandidates = 3"),
    })
    .await;
    let admin = cluster.primary.admin(Duration::from_secs(3));
    let negotiation = cluster.negotiate(NEEDED_CONN_PER_S);

    let deadline = Instant::now() + WAIT;
    let mut seen_running = None;
    loop {
        if seen_running.is_none()
            && let Ok(list) = get::<Vec<NegotiationView>>(&admin, "/v1/negotiations").await
        {
            seen_running = list
                .iter()
                .find(|n| n.state == NegotiationState::Running)
                .map(|n| n.request_id.clone());
        }
        let records = cluster.provider_records();
        let offered = records
            .iter()
            .filter(|(_, r)| r.state == State::Offered)
            .count();
        let ready = match moment {
            Moment::Started => seen_running.is_some(),
            Moment::OffersPending => seen_running.is_some() && offered == 2,
            Moment::ProviderActivating => stall.entered.load(Ordering::SeqCst),
            Moment::Concluded => negotiation.is_finished(),
        };
        if ready {
            break;
        }
        if (negotiation.is_finished() && moment != Moment::Concluded) || Instant::now() > deadline {
            panic!(
                "{moment:?} never came (negotiation finished: {}, seen running: {seen_running:?}, \
                 provider records: {:?})\n{}",
                negotiation.is_finished(),
                summary(&records),
                cluster.primary.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.primary.kill9();
    let killed_at = now_ms();
    let at_kill = cluster.provider_records();
    stall.release.store(true, Ordering::SeqCst);
    let answer = tokio::time::timeout(WAIT, negotiation)
        .await
        .unwrap()
        .unwrap();
    if moment == Moment::Concluded {
        let outcome = answer.unwrap_or_else(|e| panic!("negotiate: {e}"));
        assert_eq!(outcome.state, NegotiationState::Succeeded, "{outcome:?}");
    } else {
        assert!(
            answer.is_err(),
            "the killed daemon answered: {answer:?}\nprovider records at the kill: {:?}\n{}",
            summary(&at_kill),
            cluster.primary.log()
        );
    }

    let left = check_left_behind(&cluster.primary, "after-kill");
    eprintln!(
        "{moment:?}: provider records at the kill: {:?}; running negotiations left: {:?}",
        summary(&at_kill),
        left.running
    );
    match moment {
        Moment::Concluded => assert!(left.running.is_empty(), "{:?}", left.running),
        _ => {
            let running = seen_running.clone().unwrap_or_default();
            assert!(
                moment == Moment::ProviderActivating || left.running.contains(&running),
                "the store left behind does not show {running} running: {:?}",
                left.running
            );
            assert!(
                !left.running.is_empty(),
                "no negotiation was running at the kill"
            );
        }
    }
    if moment == Moment::ProviderActivating {
        // The case that matters: active at the provider, not (yet) at the primary.
        let stalled = at_kill
            .iter()
            .find(|(i, r)| *i == 0 && r.state == State::Active)
            .unwrap_or_else(|| panic!("provider 0 is not active at the kill: {at_kill:?}"));
        let copy = cluster
            .primary
            .stopped_store_copy("after-kill-primary-view");
        let mine = copy
            .arrangements(&ArrangementFilter {
                role: Some(Role::Primary),
                peer: Some(cluster.providers[0].fingerprint()),
                ..ArrangementFilter::default()
            })
            .unwrap();
        assert!(
            mine.iter()
                .all(|p| p.state != State::Active || p.peer_ref.as_deref() != Some(&stalled.1.id)),
            "the primary recorded the stalled activation: {mine:?}"
        );
    }

    cluster.primary.spawn();
    let status = cluster.primary.wait_ready().await;
    assert!(status.started_ms >= killed_at, "{status:?}");
    cluster
        .primary
        .live_store()
        .verify()
        .unwrap_or_else(|e| panic!("the restarted daemon's store fails its checks: {e}"));
    assert_abandoned(&cluster.primary, &left).await;
    cluster
        .wait_settled(&format!("restart after kill -9 ({moment:?})"))
        .await;
    eprintln!(
        "{moment:?}: settled after the restart: {:?}",
        summary(&cluster.provider_records())
    );
    if moment == Moment::OffersPending {
        // The primary declines the offers it can no longer take: the providers release them.
        wait_for(
            "the providers' offers are cancelled",
            || {
                let open = cluster
                    .provider_records()
                    .into_iter()
                    .filter(|(_, r)| matches!(r.state, State::Offered | State::Accepted))
                    .collect::<Vec<_>>();
                open.is_empty()
                    .then_some(())
                    .ok_or_else(|| format!("{:?}", summary(&open)))
            },
            &cluster.primary,
        )
        .await;
    }
    if moment == Moment::Concluded {
        // Nothing was half-done: both arrangements are re-confirmed, not ended.
        let store = cluster.primary.live_store();
        let active = store
            .arrangements(&ArrangementFilter {
                role: Some(Role::Primary),
                states: vec![State::Active],
                ..ArrangementFilter::default()
            })
            .unwrap();
        assert_eq!(active.len(), 2, "{active:?}\n{}", cluster.primary.log());
    }

    // Settled means settled: after a heartbeat round both sides still agree.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let store = cluster.primary.live_store();
    if let Err(problems) = cluster.agreement(&store) {
        panic!(
            "the sides drifted apart again: {problems}\n{}",
            cluster.primary.log()
        );
    }

    // The restarted primary negotiates again: nothing is wedged.
    let again = tokio::time::timeout(
        Duration::from_secs(30),
        cluster.negotiate(NEEDED_CONN_PER_S),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap_or_else(|e| {
        panic!(
            "negotiating after the restart: {e}\n{}",
            cluster.primary.log()
        )
    });
    assert_ne!(again.state, NegotiationState::Running, "{again:?}");
    assert_ne!(again.state, NegotiationState::Failed, "{again:?}");
    cluster.wait_settled("after a second negotiation").await;
    cluster.primary.live_store().verify().unwrap();
    cluster.shutdown().await;
}

/// Polls `check` until it returns `Ok` (bounded by [`WAIT`]); panics with its last error.
async fn wait_for<F: FnMut() -> Result<(), String>>(what: &str, mut check: F, primary: &Daemon) {
    let deadline = Instant::now() + WAIT;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => {
                panic!("not within {WAIT:?}: {what}: {e}\n{}", primary.log())
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn kill_9_right_after_the_negotiation_started() {
    kill_9_and_restart(Moment::Started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn kill_9_with_offers_pending() {
    kill_9_and_restart(Moment::OffersPending).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn kill_9_while_a_provider_activates() {
    kill_9_and_restart(Moment::ProviderActivating).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn kill_9_after_the_arrangements_became_active() {
    kill_9_and_restart(Moment::Concluded).await;
}

// ----------------------------------------------------------------------- restart tests

/// One provider, a negotiation that succeeds; returns the primary's active arrangement.
async fn active_arrangement(cluster: &Cluster) -> ArrangementRecord {
    let outcome = tokio::time::timeout(Duration::from_secs(30), cluster.negotiate(300))
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_else(|e| panic!("negotiate: {e}\n{}", cluster.primary.log()));
    assert_eq!(outcome.state, NegotiationState::Succeeded, "{outcome:?}");
    assert_eq!(outcome.arrangements.len(), 1, "{outcome:?}");
    let store = cluster.primary.live_store();
    let a = store
        .arrangement(&outcome.arrangements[0])
        .unwrap()
        .unwrap();
    assert_eq!(a.state, State::Active, "{a:?}");
    let q = provider_side(cluster, &a);
    assert_eq!(q.state, State::Active, "provider side: {q:?}");
    a
}

fn provider_side(cluster: &Cluster, a: &ArrangementRecord) -> ArrangementRecord {
    let id = a.peer_ref.clone().unwrap_or_else(|| a.id.clone());
    cluster.providers[0]
        .store()
        .arrangement(&id)
        .unwrap()
        .unwrap_or_else(|| panic!("the provider has no arrangement {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reconfirms_an_active_arrangement_and_keeps_it_on_both_sides() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(ClusterSpec {
        providers: 1,
        black_hole: false,
        first_provider_hooks: None,
        primary_overlay: service_overlay(600, ""),
    })
    .await;
    let a = active_arrangement(&cluster).await;
    let provider_id = a.peer_ref.clone().unwrap();

    let (status, took) = cluster.primary.terminate().await;
    assert!(
        status.success(),
        "SIGTERM: {status}\n{}",
        cluster.primary.log()
    );
    eprintln!("graceful stop took {took:?}");
    let stopped = cluster.primary.stopped_store_copy("after-sigterm");
    stopped.verify().unwrap();
    assert_eq!(
        stopped.arrangement(&a.id).unwrap().unwrap().state,
        State::Active,
        "a graceful stop must leave the arrangement for the restart to re-confirm"
    );
    assert_eq!(provider_side(&cluster, &a).state, State::Active);

    let restarted_ms = now_ms();
    cluster.primary.spawn();
    cluster.primary.wait_ready().await;

    // Re-confirmed: the provider hears a heartbeat from the restarted primary.
    let provider = cluster.providers[0].store().clone();
    let deadline = Instant::now() + WAIT;
    loop {
        let heard = provider.usage(&provider_id).unwrap().into_iter().any(|u| {
            u.source == UsageSource::Peer
                && u.kind == UsageKind::Heartbeat
                && u.at_ms >= restarted_ms
        });
        if heard {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "the provider heard no heartbeat for {provider_id} within {WAIT:?} of the \
                 restart\n{}",
                cluster.primary.log()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let store = cluster.primary.live_store();
    assert_eq!(
        store.arrangement(&a.id).unwrap().unwrap().state,
        State::Active
    );
    assert_eq!(provider_side(&cluster, &a).state, State::Active);
    cluster.wait_settled("after the restart").await;
    let events = store.events(&a.id).unwrap();
    assert!(
        events.iter().all(|e| e.at_ms < restarted_ms),
        "the restart changed the arrangement's state: {events:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arrangement_that_expired_while_the_primary_was_down_is_disbanded_on_both_sides() {
    let _serial = SERIAL.lock().await;
    let duration_s = 4;
    let mut cluster = Cluster::start(ClusterSpec {
        providers: 1,
        black_hole: false,
        first_provider_hooks: None,
        primary_overlay: service_overlay(duration_s, ""),
    })
    .await;
    let a = active_arrangement(&cluster).await;
    let expires = a.expires_ms.expect("an active arrangement has an end time");

    let (status, _) = cluster.primary.terminate().await;
    assert!(
        status.success(),
        "SIGTERM: {status}\n{}",
        cluster.primary.log()
    );
    let stopped = cluster.primary.stopped_store_copy("after-sigterm");
    let at_stop = stopped.arrangement(&a.id).unwrap().unwrap();
    assert_eq!(
        at_stop.state,
        State::Active,
        "the arrangement ended before the primary stopped ({} s is too short for this \
         machine?): {at_stop:?}",
        duration_s
    );
    assert!(now_ms() < expires, "the primary stopped after the end time");

    // Down past the end time (the provider keeps it a while for the primary's disband).
    let wait = u64::try_from(expires - now_ms()).unwrap_or(0) + 500;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(
        provider_side(&cluster, &a).state,
        State::Active,
        "the provider ended it on its own before the restart"
    );

    cluster.primary.spawn();
    cluster.primary.wait_ready().await;
    let store = cluster.primary.live_store();
    let deadline = Instant::now() + WAIT;
    loop {
        let p = store.arrangement(&a.id).unwrap().unwrap();
        let q = provider_side(&cluster, &a);
        if p.state == State::Disbanded && q.state == State::Disbanded {
            assert!(p.ended_ms.is_some_and(|t| t >= expires), "{p:?}");
            assert!(
                p.end_reason
                    .as_deref()
                    .is_some_and(|r| r.to_lowercase().contains("expire")),
                "{p:?}"
            );
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "within {WAIT:?} of the restart: primary {:?} ({:?}), provider {:?} ({:?})\n{}",
                p.state,
                p.end_reason,
                q.state,
                q.end_reason,
                cluster.primary.log()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    store.verify().unwrap();
    cluster.providers[0].store().verify().unwrap();
    cluster.shutdown().await;
}

// ------------------------------------------------------------------- process contract

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_promptly_and_frees_the_ports() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::pick();
    let prepared = testbed::prepare(dir.path(), "solo", &[], &ports.overlay()).unwrap();
    let mut daemon = Daemon::new(prepared);
    daemon.spawn();
    let status = daemon.wait_ready().await;
    assert_eq!(status.fingerprint, daemon.prepared.fingerprint);
    // Its gossip port is bound while it runs.
    assert!(
        UdpSocket::bind(("127.0.0.1", ports.gossip)).is_err(),
        "the gossip port is not bound while the daemon runs"
    );
    let (exit, took) = daemon.terminate().await;
    assert_eq!(exit.code(), Some(0), "{exit}\n{}", daemon.log());
    eprintln!("SIGTERM to exit: {took:?}");
    ports.assert_free("after SIGTERM");
    daemon.stopped_store_copy("after-sigterm").verify().unwrap();
}

/// Runs `p2pcdn run` on `config` while the test holds the config's ports, then once more
/// without, and checks both exit 64 with one line containing `expect`.
fn assert_refused_before_binding(config: &Path, ports: Ports, expect: &str, case: &str) {
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_p2pcdn"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env_remove("P2PCDN_CONFIG")
            .env_remove("P2PCDN_TOKEN")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let held = ports.hold().unwrap();
    // A daemon that bound before checking would fail on the held ports instead.
    let out = run();
    drop(held);
    let again = run();
    for (when, out) in [
        ("with its ports taken", &out),
        ("with its ports free", &again),
    ] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{case} ({when}): {}: {err}",
            out.status
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{case} ({when}): {err}");
        assert!(
            err.contains(expect),
            "{case} ({when}): {err:?} lacks {expect:?}"
        );
        assert!(
            !err.to_lowercase().contains("in use"),
            "{case} ({when}): {err}"
        );
    }
    ports.assert_free(case);
}

#[test]
fn bad_config_exits_64_before_anything_binds() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::pick();
    let prepared = testbed::prepare(dir.path(), "badconf", &[], &ports.overlay()).unwrap();
    let config = prepared.config_path.clone();
    let key = prepared.config.tls.key.clone();
    let good_key = fs::read(&key).unwrap();
    let text = fs::read_to_string(&config).unwrap();
    let put_key = |bytes: &[u8]| {
        fs::write(&key, bytes).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    };

    // The key file (the config itself is valid).
    put_key(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n");
    assert_refused_before_binding(&config, ports, "tls.key", "corrupt key file");
    put_key(b"");
    assert_refused_before_binding(&config, ports, "tls.key", "empty key file");
    let other = tempfile::tempdir().unwrap();
    let stranger = NodeIdentity::generate("stranger", "Testbed", &[]).unwrap();
    stranger
        .write(&other.path().join("k.pem"), &other.path().join("c.pem"))
        .unwrap();
    put_key(&fs::read(other.path().join("k.pem")).unwrap());
    assert_refused_before_binding(&config, ports, "tls.key", "key of another certificate");
    put_key(&good_key);
    fs::set_permissions(&key, fs::Permissions::from_mode(0o000)).unwrap();
    if fs::read(&key).is_err() {
        assert_refused_before_binding(&config, ports, "tls.key", "unreadable key file");
    } else {
        eprintln!("skipping the unreadable-key case: mode 000 does not stop this user (root)");
    }
    put_key(&good_key);

    // The config file: an unknown key (a typo) and a bad address, with the other listeners
    // valid and held.
    let typo = dir.path().join("typo.toml");
    fs::write(
        &typo,
        text.replacen("[node]\n", "[node]\nlisen = \"127.0.0.1:1\"\n", 1),
    )
    .unwrap();
    assert_refused_before_binding(&typo, ports, "node.lisen", "unknown key");
    let bad_addr = dir.path().join("bad-addr.toml");
    let seeds = "seeds = []";
    assert!(text.contains(seeds), "the testbed config changed: {text}");
    fs::write(
        &bad_addr,
        text.replacen(seeds, "seeds = [\"127.0.0.1:99999\"]", 1),
    )
    .unwrap();
    assert_refused_before_binding(&bad_addr, ports, "discovery.seeds", "bad seed address");

    // The same directory with a good key runs: the cases above failed for their reason only.
    let mut daemon = Daemon::new(prepared);
    daemon.spawn();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        daemon.wait_ready().await;
        let (exit, _) = daemon.terminate().await;
        assert_eq!(exit.code(), Some(0), "{}", daemon.log());
    });
}
