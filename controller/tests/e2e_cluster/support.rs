//! A cluster of real daemons in one process: every node from `daemon::testbed::prepare`
//! (its own key, certificate, config file and SQLite store in a temporary directory) and
//! `daemon::start` (mutual TLS gRPC, gossip and the admin API on 127.0.0.1 port 0). The first
//! node started is every later node's gossip seed.

use std::{
    future::Future,
    net::SocketAddr,
    time::{Duration, Instant},
};

use p2pcdn_controller::{
    admin::{NegotiateRequest, NegotiationState, NegotiationView},
    config::Config,
    daemon::{
        self, Node, Options,
        testbed::{self, Prepared},
    },
    model::{Fingerprint, Role, now_ms},
    proto::pb,
    store::{ArrangementEvent, ArrangementFilter, ArrangementRecord},
};
use tempfile::TempDir;
use tokio::task::JoinSet;

/// Every wait of these tests ends after this long with a message saying what was missing.
pub const WAIT: Duration = Duration::from_secs(10);

/// Discovery settings of every node: gossip fast enough for quick convergence, liveness
/// thresholds generous enough that a loaded machine does not flap a healthy node to suspect
/// (these tests are about negotiation, not failure detection).
const DISCOVERY: &str =
    "[discovery]\ngossip_interval_ms = 100\nsuspect_after_ms = 5000\ndead_after_ms = 15000\n";

/// The service a primary steers overflow of (put in the primary's overlay).
pub const SERVICE: &str =
    "[[services]]\nname = \"web\"\naddresses = [\"192.0.2.80:80\"]\nduration_s = 600\n";

/// Polls `probe` until it returns `Ok`, for at most [`WAIT`]; then fails with `what` and the
/// probe's last reason.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(why) if Instant::now() >= deadline => {
                panic!("{what}: not the case after {WAIT:?}: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One running node.
pub struct Member {
    pub name: String,
    pub prepared: Prepared,
    pub node: Node,
}

impl Member {
    pub fn fingerprint(&self) -> Fingerprint {
        self.node.fingerprint()
    }

    /// Every arrangement in this node's store (both roles, every state).
    pub fn arrangements(&self) -> Vec<ArrangementRecord> {
        self.node
            .store()
            .arrangements(&ArrangementFilter {
                limit: Some(10_000),
                ..ArrangementFilter::default()
            })
            .unwrap()
    }

    /// This node's arrangements with `peer`.
    pub fn arrangements_with(&self, peer: &Member) -> Vec<ArrangementRecord> {
        self.arrangements()
            .into_iter()
            .filter(|a| a.peer == peer.fingerprint())
            .collect()
    }

    /// The one active arrangement this node has with `peer` in `role`; fails if there is
    /// none or more than one.
    pub fn active_with(&self, peer: &Member, role: Role) -> ArrangementRecord {
        let all = self.arrangements_with(peer);
        let active: Vec<_> = all
            .iter()
            .filter(|a| a.role == role && a.state == pb::ArrangementState::Active)
            .cloned()
            .collect();
        assert_eq!(
            active.len(),
            1,
            "{} should have exactly one active {} arrangement with {}; it has: {}",
            self.name,
            role.as_str(),
            peer.name,
            describe(&all)
        );
        active.into_iter().next().unwrap()
    }

    pub fn events(&self, arrangement: &str) -> Vec<ArrangementEvent> {
        self.node.store().events(arrangement).unwrap()
    }

    /// Runs a negotiation for the `web` service through the admin backend (what
    /// `POST /v1/negotiate` does) and returns its outcome.
    pub async fn negotiate(&self, new_connections_per_s: u64) -> NegotiationView {
        let request = NegotiateRequest {
            service: "web".to_owned(),
            new_connections_per_s: Some(new_connections_per_s),
            duration_s: None,
        };
        // The negotiation is bounded by the policy's timeout per step; this bound only keeps
        // a hung negotiation from hanging the test.
        tokio::time::timeout(3 * WAIT, self.node.backend().negotiate(request))
            .await
            .unwrap_or_else(|_| panic!("{}: the negotiation did not end", self.name))
            .unwrap_or_else(|e| panic!("{}: negotiate failed: {e}", self.name))
    }
}

/// One line per arrangement, for failure messages.
pub fn describe(arrangements: &[ArrangementRecord]) -> String {
    if arrangements.is_empty() {
        return "none".to_owned();
    }
    arrangements
        .iter()
        .map(|a| {
            format!(
                "[{} {} {:?} with {} ended: {:?}]",
                a.id,
                a.role.as_str(),
                a.state,
                a.peer.short(),
                a.end_reason
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn assert_succeeded(view: &NegotiationView, requested: u64) {
    assert_eq!(
        view.state,
        NegotiationState::Succeeded,
        "negotiation should succeed: {view:?}"
    );
    assert_eq!(view.requested_connections_per_s, requested, "{view:?}");
    assert!(
        view.covered_connections_per_s >= requested,
        "covered {} of {requested}: {view:?}",
        view.covered_connections_per_s
    );
}

/// Nodes sharing one temporary directory; the first started is the seed of the others.
pub struct Cluster {
    dir: TempDir,
    pub members: Vec<Member>,
}

impl Cluster {
    pub fn new() -> Self {
        init_tracing();
        Self {
            dir: tempfile::tempdir().unwrap(),
            members: Vec::new(),
        }
    }

    /// The seed every later node joins through: the first node's gossip address.
    pub fn seeds(&self) -> Vec<SocketAddr> {
        self.members
            .first()
            .map(|m| vec![m.node.gossip_addr()])
            .unwrap_or_default()
    }

    /// Writes node `name`'s key, certificate and config (`overlay` merged over the testbed
    /// defaults); it is not started yet.
    pub fn prepare(&self, name: &str, overlay: &str) -> Prepared {
        testbed::prepare(
            &self.dir.path().join(name),
            name,
            &self.seeds(),
            &format!("{DISCOVERY}{overlay}"),
        )
        .unwrap_or_else(|e| panic!("prepare {name}: {e}"))
    }

    pub async fn start(&mut self, prepared: Prepared) -> &Member {
        let name = prepared.config.node.name.clone();
        let node = daemon::start(prepared.config.clone(), Options::default())
            .await
            .unwrap_or_else(|e| panic!("{name} does not start: {e}"));
        self.members.push(Member {
            name,
            prepared,
            node,
        });
        self.members.last().unwrap()
    }

    /// Prepares and starts node `name`.
    pub async fn add(&mut self, name: &str, overlay: &str) -> &Member {
        let prepared = self.prepare(name, overlay);
        self.start(prepared).await
    }

    pub fn get(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Waits until every node has every other node as a negotiation candidate (alive, with
    /// an unexpired advert).
    pub async fn wait_for_mesh(&self) {
        eventually("every node knows every other node's advert", || async {
            let now = now_ms();
            for m in &self.members {
                let candidates = m.node.registry().candidates(now);
                for other in self.members.iter().filter(|o| o.name != m.name) {
                    if !candidates
                        .iter()
                        .any(|c| c.fingerprint == other.fingerprint())
                    {
                        return Err(format!("{} does not know {} yet", m.name, other.name));
                    }
                }
            }
            Ok(())
        })
        .await;
    }

    /// Shuts every node down (in parallel), within a bound.
    pub async fn shutdown(self) {
        let mut stopping = JoinSet::new();
        for m in self.members {
            stopping.spawn(m.node.shutdown());
        }
        let all = async { while stopping.join_next().await.is_some() {} };
        tokio::time::timeout(3 * WAIT, all)
            .await
            .unwrap_or_else(|_| panic!("the nodes did not shut down within {:?}", 3 * WAIT));
        drop(self.dir);
    }
}

/// Appends `toml` to a prepared node's config file and reloads it the way `p2pcdn run`
/// would (for settings that name a node prepared later, e.g. a long-term agreement).
pub fn amend(prepared: &mut Prepared, toml: &str) {
    let mut text = std::fs::read_to_string(&prepared.config_path).unwrap();
    text.push('\n');
    text.push_str(toml);
    std::fs::write(&prepared.config_path, text).unwrap();
    prepared.config = Config::load(&prepared.config_path)
        .unwrap_or_else(|e| panic!("amended config does not load: {e}"));
}

/// Logs go to the test's captured output; `RUST_LOG` picks the level (errors only without).
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
