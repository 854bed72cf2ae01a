//! The primary's trust loop: sample providers, feed the reputation engine, act on it, and
//! share what was observed.
//!
//! - Every [`SAMPLE_TICK`], each provider of an active arrangement whose [`Budget`] allows it
//!   (1 % of the connections steered to it, one every 5 s when idle) gets one content sample
//!   ([`crate::sampler`]) of a random object of the service's signed manifest; at most one
//!   sample per provider is in flight.
//! - Every control cycle ([`CYCLE`]) the engine's decisions are applied: Maglev weights ∝
//!   capacity × trust; an isolated provider gets weight 0 at once, its arrangements are
//!   terminated for cause (dishonesty: the agreed penalty in full; unreliability: SLA breach),
//!   and it is excluded from negotiation until it recovers.
//! - Every [`GOSSIP_EVERY`] this node's signed reports of direct observations go on the
//!   gossip board, and the other nodes' reports are verified and ingested.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use prost::Message as _;
use tokio::{sync::watch, task::JoinSet};

use super::{Core, DisbandCause, off_the_workers};
use crate::{
    discovery::Board,
    manifest::Manifest,
    model::{Fingerprint, now_ms},
    proto::{self, pb},
    sampler::{self, Budget, Sample},
    store::ArrangementRecord,
    trust::{Decision, DecisionKind, TrustEngine},
};

/// How often sampling budgets are looked at.
pub(crate) const SAMPLE_TICK: Duration = Duration::from_millis(250);
/// How often the engine's decisions are applied.
pub(crate) const CYCLE: Duration = Duration::from_secs(1);
/// How often reports are published and read.
pub(crate) const GOSSIP_EVERY: Duration = Duration::from_secs(2);
/// A quarantined provider is sampled again this soon.
const CONFIRM_AFTER: Duration = Duration::from_millis(500);
/// A sample's time limit.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(3);
/// The service's manifest is fetched again this often.
const MANIFEST_EVERY: Duration = Duration::from_secs(60);

/// Per provider: what the budget needs.
#[derive(Default)]
struct Sampling {
    /// Steered connections (the data plane's cumulative count) at the last sample.
    steered_at_last: Option<u64>,
    last: Option<Instant>,
    in_flight: bool,
}

/// Runs until `stop`.
pub(crate) async fn run(core: Arc<Core>, board: Option<Board>, mut stop: watch::Receiver<bool>) {
    let engine = core.trust.clone();
    let budget = Budget::default();
    let mut manifests: HashMap<String, (Instant, Arc<Manifest>)> = HashMap::new();
    let mut sampling: HashMap<String, Sampling> = HashMap::new();
    let mut running: JoinSet<(String, Sample)> = JoinSet::new();
    let mut next_id: u64 = 1;
    let mut seen_versions: HashMap<(Fingerprint, String), u64> = HashMap::new();
    let mut sample_tick = tokio::time::interval(SAMPLE_TICK);
    let mut cycle = tokio::time::interval(CYCLE);
    let mut gossip = tokio::time::interval(GOSSIP_EVERY);
    for t in [&mut sample_tick, &mut cycle, &mut gossip] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    enum Wake {
        Stop,
        Done(Option<Result<(String, Sample), tokio::task::JoinError>>),
        Sample,
        Cycle,
        Gossip,
    }
    loop {
        let wake = tokio::select! {
            _ = stop.wait_for(|s| *s) => Wake::Stop,
            done = running.join_next(), if !running.is_empty() => Wake::Done(done),
            _ = sample_tick.tick() => Wake::Sample,
            _ = cycle.tick() => Wake::Cycle,
            _ = gossip.tick() => Wake::Gossip,
        };
        match wake {
            Wake::Stop => return,
            Wake::Done(done) => {
                let Some(done) = done else { continue };
                let Ok((arrangement, sample)) = done else {
                    continue;
                };
                if let Some(s) = sampling.get_mut(&arrangement) {
                    s.in_flight = false;
                }
                record_sample(&engine, &sample);
            }
            Wake::Sample => {
                let active = active_primaries(&core);
                sampling.retain(|id, _| active.iter().any(|a| &a.id == id));
                for a in &active {
                    let Some(steering) = core.steering.as_ref() else {
                        break;
                    };
                    let steered = off_the_workers(|| steering.peer_counters(a))
                        .ok()
                        .flatten()
                        .map_or(0, |c| c.connections);
                    let state = sampling.entry(a.id.clone()).or_default();
                    if state.in_flight {
                        continue;
                    }
                    let since = state.last.map_or(Duration::MAX, |t| t.elapsed());
                    let delta = steered.saturating_sub(state.steered_at_last.unwrap_or(steered));
                    // The engine's own requests first: the confirming sample of a quarantine.
                    let own = core.identity.fingerprint;
                    let confirm = lock(&engine)
                        .checks(now_ms())
                        .into_iter()
                        .find(|c| c.subject == a.peer && c.object.owner == own)
                        .map(|c| (c.object.path, c.object.range));
                    // A quarantined provider is sampled again at once (it carries no traffic).
                    let confirming = confirm.is_some() && since >= CONFIRM_AFTER;
                    if !budget.due(delta, since) && !confirming {
                        continue;
                    }
                    let Some(manifest) = manifest_for(&core, a, &mut manifests).await else {
                        continue;
                    };
                    let Some(target) = target_of(&core, a) else {
                        continue;
                    };
                    let picked = match &confirm {
                        Some((path, range)) => manifest.entry(path).map(|e| (e, *range)),
                        None => sampler::pick(&manifest, random_u64()),
                    };
                    let Some((entry, range)) = picked else {
                        continue;
                    };
                    let entry = entry.clone();
                    state.in_flight = true;
                    state.last = Some(Instant::now());
                    state.steered_at_last = Some(steered);
                    let id = next_id;
                    next_id += 1;
                    let arrangement = a.id.clone();
                    let origin = manifest.origin.clone();
                    running.spawn(async move {
                        let reference = match range {
                            Some(r) => {
                                sampler::origin_digest(&origin, &entry.path, r, SAMPLE_TIMEOUT)
                                    .await
                                    .ok()
                            }
                            None => None,
                        };
                        let sample =
                            sampler::sample(id, &target, &entry, range, reference, SAMPLE_TIMEOUT)
                                .await;
                        (arrangement, sample)
                    });
                }
            }
            Wake::Cycle => apply(&core, &engine).await,
            Wake::Gossip => {
                if let Some(board) = &board {
                    share(&core, &engine, board, &mut seen_versions).await;
                }
            }
        }
    }
}

/// Active primary arrangements that are not being retired.
fn active_primaries(core: &Core) -> Vec<ArrangementRecord> {
    let draining = Core::lock(&core.draining).clone();
    core.config
        .services
        .iter()
        .filter_map(|s| core.active_primary(&s.name).ok())
        .flatten()
        .filter(|a| !draining.contains(&a.id))
        .collect()
}

fn record_sample(engine: &std::sync::Mutex<TrustEngine>, sample: &Sample) {
    let verdict = match &sample.verdict {
        sampler::Verdict::Verified => "verified",
        sampler::Verdict::Corrupted(_) => "corrupted",
        sampler::Verdict::Unavailable(_) => "unavailable",
    };
    metrics::counter!("p2pcdn_samples_total", "verdict" => verdict).increment(1);
    match &sample.verdict {
        sampler::Verdict::Corrupted(why) => tracing::warn!(peer = %sample.peer.short(),
            sample = sample.id, path = %sample.path, why, "provider served corrupted content"),
        sampler::Verdict::Unavailable(why) => tracing::info!(peer = %sample.peer.short(),
            sample = sample.id, path = %sample.path, why, "sample not answered"),
        sampler::Verdict::Verified => tracing::debug!(peer = %sample.peer.short(),
            sample = sample.id, path = %sample.path, ms = sample.latency_ms, "sample verified"),
    }
    // Decisions taken on the sample are also returned by the next `tick`.
    let _ = lock(engine).observe_sample(sample);
}

/// A random number for picking samples (from the system's generator).
fn random_u64() -> u64 {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0_u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

fn lock(engine: &std::sync::Mutex<TrustEngine>) -> std::sync::MutexGuard<'_, TrustEngine> {
    engine
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The service's manifest, fetched (and verified with our own key) at most every
/// [`MANIFEST_EVERY`].
async fn manifest_for(
    core: &Core,
    a: &ArrangementRecord,
    cache: &mut HashMap<String, (Instant, Arc<Manifest>)>,
) -> Option<Arc<Manifest>> {
    let service = a.service.as_ref()?.name.clone();
    if let Some((at, m)) = cache.get(&service)
        && at.elapsed() < MANIFEST_EVERY
    {
        return Some(m.clone());
    }
    let url = core
        .config
        .services
        .iter()
        .find(|s| s.name == service)?
        .manifest_url
        .clone()?;
    match crate::surrogate::fetch_manifest(&url, None, &core.identity.spki_der, now_ms()).await {
        Ok(m) => {
            let m = Arc::new(m);
            cache.insert(service, (Instant::now(), m.clone()));
            Some(m)
        }
        Err(e) => {
            tracing::warn!(service, url, error = %e, "sampling: cannot read our own manifest");
            cache.get(&service).map(|(_, m)| m.clone())
        }
    }
}

fn target_of(core: &Core, a: &ArrangementRecord) -> Option<sampler::Target> {
    let surrogate_url = a
        .peer_endpoints
        .as_ref()
        .map(|e| e.surrogate_url.clone())
        .filter(|u| !u.is_empty())?;
    let host = a
        .service
        .as_ref()
        .and_then(|s| s.host_names.first().cloned());
    Some(sampler::Target {
        peer: a.peer,
        surrogate_url,
        host: host.filter(|h| !h.starts_with("*.")),
        primary: core.identity.fingerprint,
    })
}

/// Applies the engine's decisions of this cycle to the data plane and the arrangements.
async fn apply(core: &Arc<Core>, engine: &std::sync::Mutex<TrustEngine>) {
    let now = now_ms();
    let decisions: Vec<Decision> = lock(engine).tick(now);
    let active = active_primaries(core);
    let peers: HashSet<Fingerprint> = active.iter().map(|a| a.peer).collect();
    for d in &decisions {
        tracing::info!(peer = %d.subject.short(), kind = ?d.kind, evidence = %d.evidence_text(),
            "trust decision");
    }
    // Weights ∝ capacity × trust, for every provider in use.
    for peer in &peers {
        let factor = lock(engine).weight_factor(peer, now);
        if let Some(steering) = core.steering.as_ref()
            && (steering.trust_factor(peer) - factor).abs() > 0.01
        {
            let mine: Vec<ArrangementRecord> =
                active.iter().filter(|a| a.peer == *peer).cloned().collect();
            if let Err(e) = off_the_workers(|| steering.set_trust_factor(*peer, factor, &mine)) {
                tracing::warn!(peer = %peer.short(), error = %e, "cannot reweigh the provider");
            }
        }
    }
    for d in decisions {
        let reason = match d.kind {
            DecisionKind::Isolate { dishonest: true } => pb::DisbandReason::Dishonest,
            DecisionKind::Isolate { dishonest: false } => pb::DisbandReason::SlaBreach,
            _ => continue,
        };
        if let Some(steering) = core.steering.as_ref() {
            let mine: Vec<ArrangementRecord> = active
                .iter()
                .filter(|a| a.peer == d.subject)
                .cloned()
                .collect();
            let _ = off_the_workers(|| steering.set_trust_factor(d.subject, 0.0, &mine));
        }
        for a in active.iter().filter(|a| a.peer == d.subject) {
            let cause =
                DisbandCause::new(reason, format!("isolated by trust: {}", d.evidence_text()));
            core.disband_logged(&a.id, cause).await;
        }
    }
}

/// Publishes this node's reports and ingests the others'.
async fn share(
    core: &Core,
    engine: &std::sync::Mutex<TrustEngine>,
    board: &Board,
    seen: &mut HashMap<(Fingerprint, String), u64>,
) {
    let now = now_ms();
    let reports = lock(engine).reports(now);
    for report in reports {
        let subject = Fingerprint::from_slice(&report.subject).ok();
        let Some(subject) = subject else { continue };
        let signed = proto::sign_reputation(&core.identity, &report);
        board
            .publish(&subject.to_string(), &BASE64.encode(signed.encode_to_vec()))
            .await;
    }
    for entry in board.read().await {
        let key = (entry.from, entry.key.clone());
        if seen.get(&key) == Some(&entry.version) {
            continue;
        }
        seen.insert(key, entry.version);
        let Some(advert) = core.registry.get(&entry.from) else {
            continue;
        };
        let decoded = BASE64
            .decode(entry.value.as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                pb::SignedReputationReport::decode(bytes.as_slice()).map_err(|e| e.to_string())
            });
        let result = decoded.and_then(|signed| {
            lock(engine)
                .ingest_report(&signed, &advert.advert.public_key, now)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = result {
            metrics::counter!("p2pcdn_reputation_reports_refused_total").increment(1);
            tracing::info!(from = %entry.from.short(), error = %e, "reputation report refused");
        }
    }
}

/// Whether `peer` may be offered new arrangements (not quarantined or isolated).
pub(crate) fn usable(core: &Core, peer: &Fingerprint) -> bool {
    !lock(&core.trust).excluded(peer)
}
