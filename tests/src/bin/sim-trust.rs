//! `cargo xtask sim trust`: an adversarial simulation of the trust engine
//! (`p2pcdn_controller::trust`). Writes `target/bench/trust.json` and `trust.svg`.
//!
//! N nodes (default 100) run in one process on a simulated clock, one round per control cycle
//! (1 s). Every node but the Sybils runs the real `TrustEngine`; reports are real
//! `ReputationReport`s, signed with each node's Ed25519 key (`proto::sign_reputation`),
//! prost-encoded, carried by gossip, decoded and verified (`trust::VerifiedReport::open`)
//! before the receiving engines take them in.
//!
//! Each round, in this order:
//!
//! 1. flapping nodes go down (30 % of rounds) or come back;
//! 2. every primary spreads its overflow (`--requests` per round) over its candidate providers
//!    (`--candidates`, among them `--long-term` pre-trusted honest peers) in proportion to
//!    advertised capacity × the engine's weight factor: Maglev steering. A request steered to a
//!    corrupting provider is answered with corrupted bytes if the object it asks for is one the
//!    provider corrupts (every object, or a fixed 10 % of each primary's objects);
//! 3. sampling within a budget of `--sample-share` (0.9 %) of the overflow, three quarters of
//!    it routine: one vetting sample per candidate, then half in proportion to the traffic
//!    and half to the candidates with the least standing (vetted before they carry traffic).
//!    Each sample fetches a random object of the primary's own catalogue and compares its
//!    content hash (simulated) with the signed one; capacity is measured for every candidate
//!    (honest: 85–110 % of the advertised);
//! 4. reports due are signed and published; lying reporters and Sybils publish lies instead
//!    (bad-mouthing honest peers with confirmed mismatches of their own objects, praising bad
//!    ones), and the adversaries inject `--junk` forged or malformed reports per round;
//! 5. `--exchanges` (2) gossip exchanges of push-pull anti-entropy with `--fanout` (3) random
//!    nodes, like chitchat every 500 ms (the daemon's default);
//! 6. every engine takes in the reports it has not seen;
//! 7. the engines' checks (objects named in claims, confirming samples) from the last quarter
//!    of the budget, in up to three passes (the daemon's sampler looks every 250 ms);
//! 8. every engine ticks; decisions are recorded.
//!
//! Behaviours: honest, always corrupt, sometimes corrupt (10 % of objects), lying reporter,
//! flapping (down 30 % of rounds), capacity liar (advertises 3× what it delivers), Sybils
//! joining late (round 10; fresh identities that corrupt 10 % of objects and lie). Honest
//! peers are not perfect either: 0.5 % of samples go unanswered, 1 % are slow, and 1 in 10,000
//! is corrupted in transit (the confirming sample is then intact).
//!
//! Measured per run and over all seeds: rounds until every honest primary that uses a bad
//! peer has isolated it (from the round it started misbehaving, so isolation in its first
//! round counts 1), honest peers isolated by any honest primary, and the fraction of the
//! honest primaries' steered requests answered with corrupted bytes. Per seed, the
//! simulation's own choices come from one seeded generator (xoshiro256++); the identities are
//! generated once and kept under `--keys`, so a seed replays exactly.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use clap::Parser;
use p2pcdn_controller::{
    identity::NodeIdentity,
    model::{Fingerprint, UnixMs},
    proto::{self, pb},
    trust::{
        DecisionKind, ObjectRef, Observation, Outcome, State, TrustEngine, TrustSettings,
        VerifiedReport, claimed_reporter, decode_signed, encode_signed,
    },
};
use plotters::{
    prelude::{
        BLACK, ChartBuilder, IntoDrawingArea, LineSeries, PathElement, RGBColor, SVGBackend,
        SeriesLabelPosition, ShapeStyle, WHITE,
    },
    style::Color as _,
};
use serde::Serialize;
use serde_json::{Value, json};

/// The simulated clock's origin.
const T0: UnixMs = 1_700_000_000_000;
/// One round: one control cycle.
const ROUND_MS: i64 = 1000;
/// Honest providers: share of samples unanswered (network loss).
const LOSS: f64 = 0.005;
/// Honest providers: share of answers slower than the latency target.
const SLOW: f64 = 0.01;
/// Honest providers: share of samples corrupted in transit (not reproducible).
const TRANSIENT: f64 = 1e-4;
/// Liars and Sybils re-publish their lies this often, rounds (as often as honest reports).
const LIE_EVERY: u32 = 5;
/// Subjects a Sybil lies about per publication.
const SYBIL_SUBJECTS: usize = 12;

#[derive(Parser, Debug, Clone, Serialize)]
#[command(about = "Adversarial simulation of the trust engine (cargo xtask sim trust)")]
struct Args {
    /// The JSON results.
    #[arg(long, default_value = "target/bench/trust.json")]
    out: PathBuf,
    /// The SVG plot (default: the JSON's path with `.svg`).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Node identities, generated once and reused (default: `trust-keys/` beside the JSON).
    #[arg(long)]
    keys: Option<PathBuf>,
    /// Runs, each with its own seed.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Nodes (Sybils come on top).
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Rounds (control cycles of 1 s) per run.
    #[arg(long, default_value_t = 30)]
    rounds: u32,
    /// Share of nodes that serve corrupted content.
    #[arg(long, default_value_t = 0.3)]
    corrupt_share: f64,
    /// Of those, the share that corrupts only some objects (the rest corrupt every object).
    #[arg(long, default_value_t = 0.5)]
    sometimes_share: f64,
    /// Share of each primary's objects a "sometimes" corrupter (and a Sybil) corrupts.
    #[arg(long, default_value_t = 0.1)]
    sometimes_rate: f64,
    /// Share of lying reporters (they serve correctly).
    #[arg(long, default_value_t = 0.2)]
    liar_share: f64,
    /// Share of flapping nodes.
    #[arg(long, default_value_t = 0.05)]
    flapping_share: f64,
    /// Share of rounds a flapping node is down.
    #[arg(long, default_value_t = 0.3)]
    flapping_down: f64,
    /// Share of capacity liars.
    #[arg(long, default_value_t = 0.05)]
    capacity_liar_share: f64,
    /// What a capacity liar advertises, × what it delivers.
    #[arg(long, default_value_t = 3.0)]
    capacity_lie: f64,
    /// Sybils joining late, as a share of `--nodes`.
    #[arg(long, default_value_t = 0.05)]
    sybil_share: f64,
    /// The round the Sybils join in.
    #[arg(long, default_value_t = 10)]
    sybil_round: u32,
    /// Candidate providers per primary.
    #[arg(long, default_value_t = 12)]
    candidates: usize,
    /// Of those, long-term (pre-trusted) peers, drawn from the honest nodes.
    #[arg(long, default_value_t = 3)]
    long_term: usize,
    /// Overflow requests each primary steers per round.
    #[arg(long, default_value_t = 4000)]
    requests: u64,
    /// Sampling budget, share of the overflow (a quarter is kept for the engine's checks).
    #[arg(long, default_value_t = 0.009)]
    sample_share: f64,
    /// Objects in each primary's manifest.
    #[arg(long, default_value_t = 1000)]
    objects: u64,
    /// Gossip partners per exchange.
    #[arg(long, default_value_t = 3)]
    fanout: usize,
    /// Gossip exchanges per round.
    #[arg(long, default_value_t = 2)]
    exchanges: usize,
    /// Forged or malformed reports the adversaries inject per round.
    #[arg(long, default_value_t = 4)]
    junk: usize,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
}

impl Args {
    fn validate(&self) -> Result<()> {
        ensure!(
            (10..=1000).contains(&self.nodes),
            "--nodes {} (10..=1000; the issue's range is 50..=200)",
            self.nodes
        );
        ensure!(
            self.seeds >= 1 && self.rounds >= 1,
            "--seeds and --rounds must be ≥ 1"
        );
        for (name, v) in [
            ("--corrupt-share", self.corrupt_share),
            ("--sometimes-share", self.sometimes_share),
            ("--sometimes-rate", self.sometimes_rate),
            ("--liar-share", self.liar_share),
            ("--flapping-share", self.flapping_share),
            ("--flapping-down", self.flapping_down),
            ("--capacity-liar-share", self.capacity_liar_share),
            ("--sybil-share", self.sybil_share),
            ("--sample-share", self.sample_share),
        ] {
            ensure!((0.0..=1.0).contains(&v), "{name} {v} is not within [0, 1]");
        }
        let bad =
            self.corrupt_share + self.liar_share + self.flapping_share + self.capacity_liar_share;
        let honest = self.nodes as f64 * (1.0 - bad);
        ensure!(
            honest >= (self.long_term + 2) as f64,
            "the shares leave {honest:.0} honest nodes, fewer than --long-term + 2"
        );
        ensure!(
            self.candidates > self.long_term && self.candidates < self.nodes,
            "--candidates must exceed --long-term and be below --nodes"
        );
        ensure!(self.capacity_lie >= 1.0, "--capacity-lie must be ≥ 1");
        ensure!(
            self.fanout >= 1 && self.objects >= 1,
            "--fanout and --objects must be ≥ 1"
        );
        Ok(())
    }

    fn sybils(&self) -> usize {
        (self.nodes as f64 * self.sybil_share).round() as usize
    }
}

// ---------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xoshiro256++ (Blackman, Vigna), seeded by splitmix64.
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        Self([
            splitmix(&mut x),
            splitmix(&mut x),
            splitmix(&mut x),
            splitmix(&mut x),
        ])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1).
    fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// A keyed hash: which objects a provider corrupts (stands in for comparing SHA-256 digests
/// of the served bytes with the signed ones).
fn object_hash(seed: u64, provider: usize, owner: usize, object: u64) -> f64 {
    let mut x = seed ^ ((provider as u64) << 40) ^ ((owner as u64) << 20) ^ object;
    splitmix(&mut x);
    (splitmix(&mut x) >> 11) as f64 / (1u64 << 53) as f64
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
enum Behaviour {
    Honest,
    AlwaysCorrupt,
    SometimesCorrupt,
    LyingReporter,
    Flapping,
    CapacityLiar,
    Sybil,
}

impl Behaviour {
    /// Must be isolated.
    fn is_bad(self) -> bool {
        matches!(
            self,
            Self::AlwaysCorrupt | Self::SometimesCorrupt | Self::CapacityLiar | Self::Sybil
        )
    }

    /// Lying reporters praise these.
    fn praised_by_liars(self) -> bool {
        !matches!(self, Self::Honest | Self::Flapping)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Honest => "honest",
            Self::AlwaysCorrupt => "always_corrupt",
            Self::SometimesCorrupt => "sometimes_corrupt",
            Self::LyingReporter => "lying_reporter",
            Self::Flapping => "flapping",
            Self::CapacityLiar => "capacity_liar",
            Self::Sybil => "sybil",
        }
    }
}

struct NodeInfo<'a> {
    id: &'a NodeIdentity,
    fp: Fingerprint,
    behaviour: Behaviour,
    /// Capacity it delivers, relative.
    actual: f64,
    advertised: f64,
    candidates: Vec<usize>,
    up: bool,
    joined: bool,
    /// Lies are published in rounds where `(round + phase) % LIE_EVERY == 0`.
    phase: u32,
}

/// One gossip message: the wire bytes of a signed report, verified once on first delivery.
struct Msg {
    bytes: Vec<u8>,
    origin: usize,
    junk: bool,
    verified: Option<Result<VerifiedReport, &'static str>>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct RoundStat {
    steered: f64,
    corrupted: f64,
    /// Steered to bad peers (any request, corrupted or not).
    to_bad: f64,
    /// (honest primary, bad candidate) pairs not isolated yet.
    unisolated_pairs: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
struct RunResult {
    seed: u64,
    /// (behaviour, rounds to isolate) per bad peer with honest users, isolated by all of them.
    rounds: Vec<(Behaviour, u32)>,
    /// Bad peers some honest user never isolated.
    unisolated: Vec<Behaviour>,
    honest_isolated: usize,
    honest_quarantines: u64,
    honest_quarantine_reasons: BTreeMap<String, u64>,
    flapping_isolated: usize,
    liars_isolated: usize,
    steered: f64,
    corrupted: f64,
    failed: f64,
    kept_local: f64,
    samples: u64,
    checks: u64,
    messages: u64,
    deliveries: u64,
    superseded: u64,
    refused: BTreeMap<&'static str, u64>,
    junk_accepted: u64,
    liar_credibility: f64,
    honest_credibility: f64,
    sybil_credibility: f64,
    flapping_weight_ratio: f64,
    per_round: Vec<RoundStat>,
}

struct Sim<'a> {
    a: &'a Args,
    seed: u64,
    rng: Rng,
    nodes: Vec<NodeInfo<'a>>,
    engines: Vec<Option<TrustEngine>>,
    spki: HashMap<Fingerprint, &'a [u8]>,
    by_fp: HashMap<Fingerprint, usize>,
    msgs: Vec<Msg>,
    /// Per node, the messages it holds (bitset over `msgs`).
    known: Vec<Vec<u64>>,
    /// Per node, the messages its engine took in.
    taken: Vec<Vec<u64>>,
    fractions: HashMap<(usize, usize), f64>,
    next_id: u64,
    /// (honest primary, subject) → round of isolation.
    isolated_at: HashMap<(usize, usize), u32>,
    r: RunResult,
}

fn set_bit(bits: &mut Vec<u64>, i: usize) {
    let w = i / 64;
    if bits.len() <= w {
        bits.resize(w + 1, 0);
    }
    bits[w] |= 1 << (i % 64);
}

fn union_into(dst: &mut Vec<u64>, src: &[u64]) {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

impl<'a> Sim<'a> {
    fn new(a: &'a Args, seed: u64, pool: &'a [NodeIdentity]) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let n = a.nodes;
        let sybils = a.sybils();
        let total = n + sybils;
        ensure!(pool.len() >= total, "identity pool too small");
        let mut ids: Vec<usize> = (0..pool.len()).collect();
        rng.shuffle(&mut ids);
        // Behaviours.
        let count = |share: f64| (n as f64 * share).round() as usize;
        let corrupt = count(a.corrupt_share);
        let sometimes = (corrupt as f64 * a.sometimes_share).round() as usize;
        let mut behaviours: Vec<Behaviour> = Vec::with_capacity(n);
        behaviours.extend(std::iter::repeat_n(
            Behaviour::AlwaysCorrupt,
            corrupt - sometimes,
        ));
        behaviours.extend(std::iter::repeat_n(Behaviour::SometimesCorrupt, sometimes));
        behaviours.extend(std::iter::repeat_n(
            Behaviour::LyingReporter,
            count(a.liar_share),
        ));
        behaviours.extend(std::iter::repeat_n(
            Behaviour::Flapping,
            count(a.flapping_share),
        ));
        behaviours.extend(std::iter::repeat_n(
            Behaviour::CapacityLiar,
            count(a.capacity_liar_share),
        ));
        ensure!(behaviours.len() < n, "no honest nodes left");
        behaviours.resize(n, Behaviour::Honest);
        rng.shuffle(&mut behaviours);
        behaviours.extend(std::iter::repeat_n(Behaviour::Sybil, sybils));
        let mut nodes: Vec<NodeInfo<'a>> = Vec::with_capacity(total);
        for (i, behaviour) in behaviours.iter().copied().enumerate() {
            let id = &pool[ids[i]];
            let actual = 500.0 + 1000.0 * rng.f64();
            let advertised = if behaviour == Behaviour::CapacityLiar {
                actual * a.capacity_lie
            } else {
                actual
            };
            nodes.push(NodeInfo {
                id,
                fp: id.fingerprint,
                behaviour,
                actual,
                advertised,
                candidates: Vec::new(),
                up: true,
                joined: behaviour != Behaviour::Sybil,
                phase: rng.below(LIE_EVERY as usize) as u32,
            });
        }
        let honest: Vec<usize> = (0..n)
            .filter(|&i| nodes[i].behaviour == Behaviour::Honest)
            .collect();
        let mut engines = Vec::with_capacity(total);
        for i in 0..total {
            if nodes[i].behaviour == Behaviour::Sybil {
                engines.push(None);
                continue;
            }
            // Long-term peers: honest nodes (operators choose them out of band).
            let mut long_term: Vec<usize> = honest.iter().copied().filter(|&h| h != i).collect();
            rng.shuffle(&mut long_term);
            long_term.truncate(a.long_term);
            let mut others: Vec<usize> = (0..n)
                .filter(|&j| j != i && !long_term.contains(&j))
                .collect();
            rng.shuffle(&mut others);
            others.truncate(a.candidates - long_term.len());
            let mut candidates = long_term.clone();
            candidates.extend(others);
            nodes[i].candidates = candidates;
            let pre: Vec<Fingerprint> = long_term.iter().map(|&j| nodes[j].fp).collect();
            engines.push(Some(
                TrustEngine::new(nodes[i].fp, TrustSettings::default(), pre)
                    .context("engine settings")?,
            ));
        }
        let spki = nodes
            .iter()
            .map(|x| (x.fp, x.id.spki_der.as_slice()))
            .collect();
        let by_fp = nodes.iter().enumerate().map(|(i, x)| (x.fp, i)).collect();
        Ok(Self {
            a,
            seed,
            rng,
            nodes,
            engines,
            spki,
            by_fp,
            msgs: Vec::new(),
            known: vec![Vec::new(); total],
            taken: vec![Vec::new(); total],
            fractions: HashMap::new(),
            next_id: 1,
            isolated_at: HashMap::new(),
            r: RunResult {
                seed,
                ..RunResult::default()
            },
        })
    }

    fn honest(&self, i: usize) -> bool {
        self.nodes[i].behaviour == Behaviour::Honest
    }

    fn corrupts(&self, provider: usize, owner: usize, object: u64) -> bool {
        match self.nodes[provider].behaviour {
            Behaviour::AlwaysCorrupt => true,
            Behaviour::SometimesCorrupt | Behaviour::Sybil => {
                object_hash(self.seed, provider, owner, object) < self.a.sometimes_rate
            }
            _ => false,
        }
    }

    /// Share of `owner`'s objects `provider` corrupts (what a steered request hits).
    fn corrupt_fraction(&mut self, provider: usize, owner: usize) -> f64 {
        match self.nodes[provider].behaviour {
            Behaviour::AlwaysCorrupt => 1.0,
            Behaviour::SometimesCorrupt | Behaviour::Sybil => {
                if let Some(f) = self.fractions.get(&(provider, owner)) {
                    return *f;
                }
                let bad = (0..self.a.objects)
                    .filter(|&o| self.corrupts(provider, owner, o))
                    .count();
                let f = bad as f64 / self.a.objects as f64;
                self.fractions.insert((provider, owner), f);
                f
            }
            _ => 0.0,
        }
    }

    fn object(&self, owner: usize, o: u64) -> ObjectRef {
        ObjectRef {
            owner: self.nodes[owner].fp,
            path: format!("/o/{o}"),
            range: None,
        }
    }

    /// Fetches `object` (number `o` of `owner`'s catalogue) from `provider`.
    fn fetch(&mut self, provider: usize, owner: usize, o: u64, object: ObjectRef) -> Outcome {
        let p = &self.nodes[provider];
        if !p.up || self.rng.chance(LOSS) {
            return Outcome::Unavailable {
                detail: "no answer within 3000 ms".into(),
            };
        }
        let slow_share = if p.behaviour == Behaviour::CapacityLiar {
            0.2
        } else {
            SLOW
        };
        if self.corrupts(provider, owner, o) || self.rng.chance(TRANSIENT) {
            return Outcome::Corrupted {
                object,
                detail: "sha256 mismatch".into(),
            };
        }
        let latency_ms = if self.rng.chance(slow_share) {
            600.0 + 1400.0 * self.rng.f64()
        } else {
            20.0 + 80.0 * self.rng.f64()
        };
        Outcome::Verified { object, latency_ms }
    }

    /// An index drawn in proportion to `weights` (`None` if they are all 0).
    fn pick(&mut self, weights: &[f64]) -> Option<usize> {
        let total: f64 = weights.iter().sum();
        if total.is_nan() || total <= 0.0 {
            return None;
        }
        let mut x = self.rng.f64() * total;
        for (k, w) in weights.iter().enumerate() {
            if x < *w {
                return Some(k);
            }
            x -= w;
        }
        weights.iter().rposition(|w| *w > 0.0)
    }

    /// The engines' checks, from what is left of each primary's budget. A check can ask for
    /// another (the confirming sample of a corruption it found): up to three passes, as the
    /// daemon's sampler would within one control cycle (it looks every 250 ms).
    fn checks(&mut self, used: &mut [usize], budget: usize, now: UnixMs) {
        for (p, spent) in used.iter_mut().enumerate() {
            for _pass in 0..3 {
                let Some(engine) = self.engines[p].as_ref() else {
                    break;
                };
                let left = budget.saturating_sub(*spent);
                let checks = engine.checks(now);
                if checks.is_empty() || left == 0 {
                    break;
                }
                for check in checks.into_iter().take(left) {
                    let (Some(&j), Some(&owner)) = (
                        self.by_fp.get(&check.subject),
                        self.by_fp.get(&check.object.owner),
                    ) else {
                        continue;
                    };
                    let Some(o) = check
                        .object
                        .path
                        .strip_prefix("/o/")
                        .and_then(|x| x.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    let outcome = self.fetch(j, owner, o, check.object.clone());
                    self.observe(p, j, now, outcome);
                    *spent += 1;
                    if self.honest(p) {
                        self.r.checks += 1;
                    }
                }
            }
            if self.honest(p) {
                self.r.samples += *spent as u64;
            }
        }
    }

    fn observe(&mut self, p: usize, subject: usize, at: UnixMs, outcome: Outcome) {
        let id = self.next_id;
        self.next_id += 1;
        let fp = self.nodes[subject].fp;
        if let Some(e) = self.engines[p].as_mut() {
            e.observe(fp, Observation { id, at, outcome });
        }
    }

    fn publish(&mut self, origin: usize, bytes: Vec<u8>, junk: bool) {
        let i = self.msgs.len();
        self.msgs.push(Msg {
            bytes,
            origin,
            junk,
            verified: None,
        });
        set_bit(&mut self.known[origin], i);
        self.r.messages += 1;
    }

    fn run(mut self) -> RunResult {
        for round in 0..self.a.rounds {
            self.round(round);
        }
        self.finish();
        self.r
    }

    fn round(&mut self, round: u32) {
        let now = T0 + i64::from(round) * ROUND_MS;
        let a = self.a;
        let total = self.nodes.len();
        // 1. Membership: Sybils join, flapping nodes go up or down.
        if round == a.sybil_round {
            let n = a.nodes;
            let join_p = a.candidates as f64 / n as f64;
            for s in n..total {
                self.nodes[s].joined = true;
                for p in 0..n {
                    if self.rng.chance(join_p) {
                        self.nodes[p].candidates.push(s);
                    }
                }
            }
        }
        for i in 0..total {
            if self.nodes[i].behaviour == Behaviour::Flapping {
                self.nodes[i].up = !self.rng.chance(a.flapping_down);
            }
        }
        let mut stat = RoundStat::default();
        let budget = (a.sample_share * a.requests as f64).floor() as usize;
        let reserve = budget.div_ceil(4);
        let mut used = vec![0usize; total];
        // 2. Steering and 3. sampling.
        for (p, spent) in used.iter_mut().enumerate() {
            let Some(engine) = self.engines[p].as_ref() else {
                continue;
            };
            let candidates: Vec<usize> = self.nodes[p]
                .candidates
                .iter()
                .copied()
                .filter(|&j| self.nodes[j].joined)
                .collect();
            let weights: Vec<f64> = candidates
                .iter()
                .map(|&j| self.nodes[j].advertised * engine.weight_factor(&self.nodes[j].fp, now))
                .collect();
            let states: Vec<State> = candidates
                .iter()
                .map(|&j| engine.state(&self.nodes[j].fp))
                .collect();
            // Where sampling is most needed: peers with little verified evidence.
            let need: Vec<f64> = candidates
                .iter()
                .zip(&states)
                .map(|(&j, st)| match st {
                    State::Trusted | State::Probation => {
                        1.0 - engine.standing(&self.nodes[j].fp, now)
                    }
                    _ => 0.0,
                })
                .collect();
            let sum: f64 = weights.iter().sum();
            let requests = a.requests as f64;
            let mut steered = vec![0.0; candidates.len()];
            if sum > 0.0 {
                for (k, &j) in candidates.iter().enumerate() {
                    let s = requests * weights[k] / sum;
                    steered[k] = s;
                    if !self.honest(p) {
                        continue;
                    }
                    let bad = if self.nodes[j].up {
                        s * self.corrupt_fraction(j, p)
                    } else {
                        self.r.failed += s;
                        0.0
                    };
                    stat.steered += s;
                    stat.corrupted += bad;
                    if self.nodes[j].behaviour.is_bad() {
                        stat.to_bad += s;
                    }
                }
            } else if self.honest(p) {
                self.r.kept_local += requests;
            }
            // Vetting: one sample per candidate not isolated or awaiting a recheck.
            let mut plan: Vec<usize> = (0..candidates.len())
                .filter(|&k| matches!(states[k], State::Trusted | State::Probation))
                .collect();
            self.rng.shuffle(&mut plan);
            let routine = budget - reserve;
            plan.truncate(routine);
            // The rest: a third where the traffic goes, two thirds where the evidence is thin.
            let by_traffic = plan.len() + (routine - plan.len()) / 3;
            while plan.len() < routine {
                let weights = if plan.len() < by_traffic {
                    &steered
                } else {
                    &need
                };
                match self.pick(weights).or_else(|| self.pick(&steered)) {
                    Some(k) => plan.push(k),
                    None => break,
                }
            }
            for k in plan {
                let j = candidates[k];
                let o = self.rng.next_u64() % a.objects;
                let object = self.object(p, o);
                let outcome = self.fetch(j, p, o, object);
                self.observe(p, j, now, outcome);
                *spent += 1;
            }
            // Capacity, measured for every candidate in use.
            for (k, &j) in candidates.iter().enumerate() {
                if !self.nodes[j].up || states[k] == State::Isolated {
                    continue;
                }
                let measured = self.nodes[j].actual * (0.85 + 0.25 * self.rng.f64());
                let advertised = self.nodes[j].advertised;
                self.observe(
                    p,
                    j,
                    now,
                    Outcome::Capacity {
                        advertised,
                        measured,
                    },
                );
            }
        }
        // 4. Reports, lies and junk.
        for p in 0..total {
            let due = match self.engines[p].as_mut() {
                Some(e) => e.reports(now),
                None => Vec::new(),
            };
            let node = &self.nodes[p];
            if !node.joined {
                continue;
            }
            match node.behaviour {
                Behaviour::LyingReporter | Behaviour::Sybil => {
                    if (round + node.phase).is_multiple_of(LIE_EVERY) || round == a.sybil_round {
                        self.lie(p, now);
                    }
                }
                _ => {
                    for report in due {
                        let signed = proto::sign_reputation(self.nodes[p].id, &report);
                        self.publish(p, encode_signed(&signed), false);
                    }
                }
            }
        }
        self.junk(now);
        // 5. Gossip: push-pull anti-entropy.
        let members: Vec<usize> = (0..total).filter(|&i| self.nodes[i].joined).collect();
        for _ in 0..a.exchanges {
            let snapshot = self.known.clone();
            for &i in &members {
                for _ in 0..a.fanout {
                    let j = members[self.rng.below(members.len())];
                    if j == i {
                        continue;
                    }
                    union_into(&mut self.known[i], &snapshot[j]);
                    union_into(&mut self.known[j], &snapshot[i]);
                }
            }
        }
        // 6. Every engine takes in what it has not seen.
        for p in 0..total {
            if self.engines[p].is_none() {
                continue;
            }
            let fresh: Vec<usize> = {
                let known = &self.known[p];
                let taken = &self.taken[p];
                let mut out = Vec::new();
                for (w, word) in known.iter().enumerate() {
                    let mut bits = word & !taken.get(w).copied().unwrap_or(0);
                    while bits != 0 {
                        let b = bits.trailing_zeros() as usize;
                        out.push(w * 64 + b);
                        bits &= bits - 1;
                    }
                }
                out
            };
            self.taken[p] = self.known[p].clone();
            for m in fresh {
                if self.msgs[m].origin == p {
                    continue;
                }
                self.verify(m, now);
                let junk = self.msgs[m].junk;
                let result = match &self.msgs[m].verified {
                    Some(Ok(v)) => match self.engines[p].as_mut() {
                        Some(e) => e.ingest_verified(v.clone(), now).map_err(|e| e.kind()),
                        None => continue,
                    },
                    Some(Err(kind)) => Err(*kind),
                    None => continue,
                };
                match result {
                    Ok(_) => {
                        self.r.deliveries += 1;
                        if junk {
                            self.r.junk_accepted += 1;
                        }
                    }
                    Err("replayed") if !junk => self.r.superseded += 1,
                    Err(kind) => *self.r.refused.entry(kind).or_default() += 1,
                }
            }
        }
        // 7. The engines' checks (claims just received, confirming samples).
        self.checks(&mut used, budget, now);
        // 8. Ticks.
        for p in 0..total {
            let Some(e) = self.engines[p].as_mut() else {
                continue;
            };
            let decisions = e.tick(now);
            if std::env::var_os("SIM_TRUST_DEBUG").is_some() && !self.honest(p) {
                for d in &decisions {
                    if let Some(&j) = self.by_fp.get(&d.subject)
                        && self.nodes[j].behaviour.is_bad()
                    {
                        eprintln!(
                            "seed {} round {round}: ({}) {p} {:?} {} {j}: {}",
                            self.seed,
                            self.nodes[p].behaviour.name(),
                            d.kind,
                            self.nodes[j].behaviour.name(),
                            d.evidence_text()
                        );
                    }
                }
            }
            if !self.honest(p) {
                continue;
            }
            for d in decisions {
                let Some(&j) = self.by_fp.get(&d.subject) else {
                    continue;
                };
                match d.kind {
                    DecisionKind::Isolate { .. } => {
                        self.isolated_at.entry((p, j)).or_insert(round);
                        match self.nodes[j].behaviour {
                            Behaviour::Honest => {
                                self.r.honest_isolated += 1;
                                eprintln!(
                                    "seed {}: honest node {j} isolated by {p} in round {round}: {}",
                                    self.seed,
                                    d.evidence_text()
                                );
                            }
                            Behaviour::Flapping => self.r.flapping_isolated += 1,
                            Behaviour::LyingReporter => self.r.liars_isolated += 1,
                            _ => {}
                        }
                    }
                    DecisionKind::Quarantine
                        if std::env::var_os("SIM_TRUST_DEBUG").is_some()
                            && self.nodes[j].behaviour.is_bad() =>
                    {
                        eprintln!(
                            "seed {} round {round}: {p} quarantines {} {j}: {}",
                            self.seed,
                            self.nodes[j].behaviour.name(),
                            d.evidence_text()
                        );
                    }
                    DecisionKind::Quarantine if self.nodes[j].behaviour == Behaviour::Honest => {
                        self.r.honest_quarantines += 1;
                        *self
                            .r
                            .honest_quarantine_reasons
                            .entry(format!("{:?}", d.reason))
                            .or_default() += 1;
                    }
                    _ => {}
                }
            }
        }
        for p in 0..self.a.nodes {
            if !self.honest(p) {
                continue;
            }
            for &j in &self.nodes[p].candidates {
                if self.nodes[j].behaviour.is_bad()
                    && self.nodes[j].joined
                    && !self.isolated_at.contains_key(&(p, j))
                {
                    stat.unisolated_pairs += 1;
                }
            }
        }
        self.r.steered += stat.steered;
        self.r.corrupted += stat.corrupted;
        self.r.per_round.push(stat);
    }

    /// Decodes and verifies message `m` once (the first delivery), as a receiver would: the
    /// wire bytes, the reporter's claimed id, its key from the membership, the signature.
    fn verify(&mut self, m: usize, now: UnixMs) {
        if self.msgs[m].verified.is_some() {
            return;
        }
        let result = decode_signed(&self.msgs[m].bytes)
            .and_then(|signed| {
                let reporter = claimed_reporter(&signed)?;
                Ok((signed, reporter))
            })
            .map_err(|e| e.kind())
            .and_then(|(signed, reporter)| match self.spki.get(&reporter) {
                Some(spki) => VerifiedReport::open(&signed, spki, now).map_err(|e| e.kind()),
                None => Err("unknown_reporter"),
            });
        self.msgs[m].verified = Some(result);
    }

    /// A liar's or Sybil's statements: praise for the bad, bad-mouthing for the honest.
    fn lie(&mut self, liar: usize, now: UnixMs) {
        let subjects: Vec<usize> = if self.nodes[liar].behaviour == Behaviour::Sybil {
            let mut s: Vec<usize> = (0..self.nodes.len())
                .filter(|&j| j != liar && self.nodes[j].joined)
                .collect();
            self.rng.shuffle(&mut s);
            s.truncate(SYBIL_SUBJECTS);
            s
        } else {
            self.nodes[liar]
                .candidates
                .iter()
                .copied()
                .filter(|&j| self.nodes[j].joined)
                .collect()
        };
        for j in subjects {
            let praise = self.nodes[j].behaviour.praised_by_liars();
            let mut r = pb::ReputationReport {
                subject: self.nodes[j].fp.0.to_vec(),
                window_start_ms: now - 60_000,
                window_end_ms: now,
                sequence: u64::try_from(now).unwrap_or(0),
                capacity_checks: 5,
                ..Default::default()
            };
            if praise {
                r.samples = 40;
                r.answered_in_sla = 40;
                r.score_ppm = 1_000_000;
            } else {
                r.samples = 20;
                r.mismatches = 8;
                r.confirmed_mismatches = 8;
                r.unanswered = 5;
                r.answered_in_sla = 15;
                r.capacity_shortfalls = 5;
                r.score_ppm = 50_000;
                r.mismatched_paths = (0..3)
                    .map(|_| format!("/o/{}", self.rng.next_u64() % self.a.objects))
                    .collect();
            }
            let signed = proto::sign_reputation(self.nodes[liar].id, &r);
            self.publish(liar, encode_signed(&signed), false);
        }
    }

    /// Forged and malformed reports, injected by an adversary.
    fn junk(&mut self, now: UnixMs) {
        let adversaries: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i].joined
                    && matches!(
                        self.nodes[i].behaviour,
                        Behaviour::LyingReporter | Behaviour::Sybil
                    )
            })
            .collect();
        let victims: Vec<usize> = (0..self.a.nodes).filter(|&i| self.honest(i)).collect();
        if adversaries.is_empty() || victims.is_empty() {
            return;
        }
        for k in 0..self.a.junk {
            let adv = adversaries[self.rng.below(adversaries.len())];
            let victim = victims[self.rng.below(victims.len())];
            let id = self.nodes[adv].id;
            let mut r = pb::ReputationReport {
                subject: self.nodes[victim].fp.0.to_vec(),
                samples: 30,
                mismatches: 30,
                confirmed_mismatches: 30,
                window_start_ms: now - 60_000,
                window_end_ms: now,
                sequence: u64::try_from(now).unwrap_or(0) + 1,
                mismatched_paths: vec!["/o/1".into()],
                ..Default::default()
            };
            let bytes = match k % 7 {
                // A genuine report with one bit of its signature flipped.
                0 => {
                    let mut s = proto::sign_reputation(id, &r);
                    if let Some(b) = s.signature.first_mut() {
                        *b ^= 1;
                    }
                    encode_signed(&s)
                }
                // The victim's words (as gossip carried them), re-signed by the adversary:
                // an impostor.
                1 => {
                    let genuine = proto::sign_reputation(self.nodes[victim].id, &r);
                    let forged = pb::SignedReputationReport {
                        signature: id.sign(proto::REPUTATION_DOMAIN, &genuine.report),
                        report: genuine.report,
                    };
                    encode_signed(&forged)
                }
                // About itself.
                2 => {
                    r.subject = self.nodes[adv].fp.0.to_vec();
                    encode_signed(&proto::sign_reputation(id, &r))
                }
                // From the future.
                3 => {
                    r.window_end_ms = now + 3_600_000;
                    encode_signed(&proto::sign_reputation(id, &r))
                }
                // Absurd counts.
                4 => {
                    r.mismatches = r.samples + 5;
                    encode_signed(&proto::sign_reputation(id, &r))
                }
                // Not a report at all.
                5 => (0..64)
                    .map(|_| (self.rng.next_u64() & 0xff) as u8)
                    .collect(),
                // Oversize.
                _ => {
                    r.mismatched_paths = vec![format!("/{}", "x".repeat(3000))];
                    encode_signed(&proto::sign_reputation(id, &r))
                }
            };
            self.publish(adv, bytes, true);
        }
    }

    fn finish(&mut self) {
        let a = self.a;
        let now = T0 + i64::from(a.rounds) * ROUND_MS;
        let honest: Vec<usize> = (0..a.nodes).filter(|&i| self.honest(i)).collect();
        for j in 0..self.nodes.len() {
            let behaviour = self.nodes[j].behaviour;
            if !behaviour.is_bad() || !self.nodes[j].joined {
                continue;
            }
            let start = if behaviour == Behaviour::Sybil {
                a.sybil_round
            } else {
                0
            };
            let users: Vec<usize> = honest
                .iter()
                .copied()
                .filter(|&p| self.nodes[p].candidates.contains(&j))
                .collect();
            if users.is_empty() {
                continue;
            }
            let mut worst = Some(0);
            for p in users {
                match self.isolated_at.get(&(p, j)) {
                    Some(&r) => worst = worst.map(|w: u32| w.max(r - start + 1)),
                    None => worst = None,
                }
            }
            if std::env::var_os("SIM_TRUST_DEBUG").is_some() && worst.is_none_or(|w| w > 5) {
                let detail: Vec<String> = honest
                    .iter()
                    .filter(|&&p| self.nodes[p].candidates.contains(&j))
                    .map(|&p| format!("{p}:{:?}", self.isolated_at.get(&(p, j))))
                    .collect();
                eprintln!(
                    "seed {}: {} {j} isolated by its users in rounds {}",
                    self.seed,
                    behaviour.name(),
                    detail.join(" ")
                );
            }
            match worst {
                Some(w) => self.r.rounds.push((behaviour, w)),
                None => self.r.unisolated.push(behaviour),
            }
        }
        // How the honest nodes weigh reporters and flapping peers at the end.
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let mut cred: BTreeMap<Behaviour, Vec<f64>> = BTreeMap::new();
        let mut ratios = Vec::new();
        for &p in &honest {
            let Some(e) = self.engines[p].as_ref() else {
                continue;
            };
            for (j, node) in self.nodes.iter().enumerate() {
                if j != p && node.joined {
                    cred.entry(node.behaviour)
                        .or_default()
                        .push(e.credibility(&node.fp));
                }
            }
            let (mut flap, mut steady) = (Vec::new(), Vec::new());
            for &j in &self.nodes[p].candidates {
                let w = e.weight_factor(&self.nodes[j].fp, now);
                match self.nodes[j].behaviour {
                    Behaviour::Flapping => flap.push(w),
                    Behaviour::Honest => steady.push(w),
                    _ => {}
                }
            }
            if !flap.is_empty() && mean(&steady) > 0.0 {
                ratios.push(mean(&flap) / mean(&steady));
            }
        }
        let c = |b| cred.get(&b).map_or(0.0, |v| mean(v));
        self.r.liar_credibility = c(Behaviour::LyingReporter);
        self.r.honest_credibility = c(Behaviour::Honest);
        self.r.sybil_credibility = c(Behaviour::Sybil);
        self.r.flapping_weight_ratio = mean(&ratios);
    }
}

// ---------------------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------------------

/// `count` identities from `dir`, generating (and saving) the missing ones.
fn identities(dir: &Path, count: usize) -> Result<Vec<NodeIdentity>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let key = dir.join(format!("{i:04}.key.pem"));
        let cert = dir.join(format!("{i:04}.cert.pem"));
        let id = if key.exists() && cert.exists() {
            NodeIdentity::load(&key, &cert).with_context(|| format!("loading {}", key.display()))?
        } else {
            let _ = fs::remove_file(&key);
            let _ = fs::remove_file(&cert);
            let id = NodeIdentity::generate(&format!("sim-{i}"), "p2pcdn trust simulation", &[])
                .context("generating an identity")?;
            id.write(&key, &cert)
                .with_context(|| format!("writing {}", key.display()))?;
            id
        };
        out.push(id);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(rounds: &[u32]) -> Value {
    let mut s = rounds.to_vec();
    s.sort_unstable();
    let mut histogram: BTreeMap<u32, u64> = BTreeMap::new();
    for r in &s {
        *histogram.entry(*r).or_default() += 1;
    }
    json!({
        "count": s.len(),
        "max": s.last().copied().unwrap_or(0),
        "mean": if s.is_empty() { 0.0 } else { s.iter().map(|&x| f64::from(x)).sum::<f64>() / s.len() as f64 },
        "p50": percentile(&s, 0.5),
        "p90": percentile(&s, 0.9),
        "p99": percentile(&s, 0.99),
        "histogram": histogram.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}

struct Totals {
    max_rounds: u32,
    honest_isolated: usize,
    corrupted_fraction: f64,
}

fn report(a: &Args, runs: &[RunResult], elapsed_s: f64) -> (Value, Totals) {
    let mut by: BTreeMap<Behaviour, Vec<u32>> = BTreeMap::new();
    let mut unisolated: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut refused: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut steered, mut corrupted, mut failed, mut kept_local) = (0.0, 0.0, 0.0, 0.0);
    let (mut samples, mut checks, mut messages, mut deliveries, mut superseded, mut junk_ok) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut honest_isolated, mut quarantines, mut flapping_isolated, mut liars_isolated) =
        (0usize, 0u64, 0usize, 0usize);
    let mut per_seed = Vec::new();
    let mut quarantine_reasons: BTreeMap<String, u64> = BTreeMap::new();
    for r in runs {
        for (b, n) in &r.rounds {
            by.entry(*b).or_default().push(*n);
        }
        for b in &r.unisolated {
            *unisolated.entry(b.name()).or_default() += 1;
        }
        for (k, v) in &r.refused {
            *refused.entry(k).or_default() += v;
        }
        steered += r.steered;
        corrupted += r.corrupted;
        failed += r.failed;
        kept_local += r.kept_local;
        samples += r.samples;
        checks += r.checks;
        messages += r.messages;
        deliveries += r.deliveries;
        superseded += r.superseded;
        junk_ok += r.junk_accepted;
        honest_isolated += r.honest_isolated;
        quarantines += r.honest_quarantines;
        for (k, v) in &r.honest_quarantine_reasons {
            *quarantine_reasons.entry(k.clone()).or_default() += v;
        }
        flapping_isolated += r.flapping_isolated;
        liars_isolated += r.liars_isolated;
        let max = r.rounds.iter().map(|x| x.1).max().unwrap_or(0);
        per_seed.push(json!({
            "seed": r.seed,
            "max_rounds_to_isolate": if r.unisolated.is_empty() { json!(max) } else { Value::Null },
            "unisolated": r.unisolated.len(),
            "honest_isolated": r.honest_isolated,
            "corrupted_fraction": if r.steered > 0.0 { r.corrupted / r.steered } else { 0.0 },
        }));
    }
    let all: Vec<u32> = by.values().flatten().copied().collect();
    let unisolated_total: u64 = unisolated.values().sum();
    // A bad peer never isolated by all its users counts as "more than the run".
    let max_rounds = if unisolated_total > 0 {
        a.rounds + 1
    } else {
        all.iter().copied().max().unwrap_or(0)
    };
    let corrupted_fraction = if steered > 0.0 {
        corrupted / steered
    } else {
        0.0
    };
    let n = runs.len().max(1) as f64;
    let rounds = a.rounds as usize;
    let per_round: Vec<Value> = (0..rounds)
        .map(|i| {
            let mut s = RoundStat::default();
            for r in runs {
                if let Some(x) = r.per_round.get(i) {
                    s.steered += x.steered;
                    s.corrupted += x.corrupted;
                    s.to_bad += x.to_bad;
                    s.unisolated_pairs += x.unisolated_pairs;
                }
            }
            json!({
                "round": i,
                "corrupted_fraction": if s.steered > 0.0 { s.corrupted / s.steered } else { 0.0 },
                "bad_share": if s.steered > 0.0 { s.to_bad / s.steered } else { 0.0 },
                "unisolated_pairs_mean": s.unisolated_pairs as f64 / n,
            })
        })
        .collect();
    let mean_of = |f: fn(&RunResult) -> f64| runs.iter().map(f).sum::<f64>() / n;
    let met = max_rounds <= 5 && honest_isolated == 0 && corrupted_fraction < 0.001;
    let doc = json!({
        "seeds": runs.len(),
        "max_rounds_to_isolate": max_rounds,
        "honest_isolated": honest_isolated,
        "corrupted_fraction": corrupted_fraction,
        "targets": {
            "max_rounds_to_isolate": 5,
            "honest_isolated": 0,
            "corrupted_fraction": 0.001,
            "met": met,
        },
        "rounds_to_isolate": {
            "all": summary(&all),
            "by_behaviour": by.iter().map(|(b, v)| (b.name().to_owned(), summary(v))).collect::<serde_json::Map<_, _>>(),
            "never_isolated_by_every_user": unisolated,
            "definition": "rounds from the start of misbehaviour (round 0, or the Sybils' join round) until every honest primary with the peer among its candidates has isolated it; isolated in its first round = 1",
        },
        "honest": {
            "isolated": honest_isolated,
            "quarantines": quarantines,
            "quarantines_by_reason": quarantine_reasons,
            "flapping_isolated_for_unreliability": flapping_isolated,
            "lying_reporters_isolated": liars_isolated,
        },
        "exposure": {
            "steered_requests": steered,
            "corrupted_requests": corrupted,
            "failed_requests": failed,
            "kept_local_requests": kept_local,
            "definition": "requests the honest primaries steered to providers over the whole run; corrupted = answered with bytes that do not match the signed manifest",
        },
        "sampling": {
            "samples": samples,
            "checks": checks,
            "share_of_steered": if steered > 0.0 { samples as f64 / steered } else { 0.0 },
        },
        "reports": {
            "messages": messages,
            "deliveries": deliveries,
            "superseded": superseded,
            "refused": refused,
            "junk_accepted": junk_ok,
        },
        "credibility_at_end": {
            "honest": mean_of(|r| r.honest_credibility),
            "lying_reporter": mean_of(|r| r.liar_credibility),
            "sybil": mean_of(|r| r.sybil_credibility),
        },
        "flapping_weight_vs_honest": mean_of(|r| r.flapping_weight_ratio),
        "per_round": per_round,
        "per_seed": per_seed,
        "config": a,
        "elapsed_s": elapsed_s,
    });
    (
        doc,
        Totals {
            max_rounds,
            honest_isolated,
            corrupted_fraction,
        },
    )
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

fn plot(path: &Path, a: &Args, runs: &[RunResult]) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let (left, right) = root.split_horizontally(600);
    let font = ("sans-serif", 16);
    let max_rounds = runs
        .iter()
        .flat_map(|r| r.rounds.iter().map(|x| x.1))
        .max()
        .unwrap_or(1)
        .max(6);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        let mut chart = ChartBuilder::on(&left)
            .caption(
                format!("rounds to isolate, {} seeds (CDF)", runs.len()),
                font,
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..f64::from(max_rounds) + 0.5, 0f64..1.05f64)?;
        chart
            .configure_mesh()
            .x_desc("rounds (control cycles of 1 s)")
            .y_desc("share of bad peers isolated by all users")
            .draw()?;
        let behaviours = [
            Behaviour::AlwaysCorrupt,
            Behaviour::SometimesCorrupt,
            Behaviour::CapacityLiar,
            Behaviour::Sybil,
        ];
        for (k, b) in behaviours.iter().enumerate() {
            let mut v: Vec<u32> = runs
                .iter()
                .flat_map(|r| r.rounds.iter().filter(|x| x.0 == *b).map(|x| x.1))
                .collect();
            let never = runs
                .iter()
                .map(|r| r.unisolated.iter().filter(|x| *x == b).count())
                .sum::<usize>();
            if v.is_empty() {
                continue;
            }
            v.sort_unstable();
            let total = (v.len() + never) as f64;
            let points: Vec<(f64, f64)> = (0..=max_rounds)
                .map(|x| {
                    let n = v.iter().filter(|&&r| r <= x).count();
                    (f64::from(x), n as f64 / total)
                })
                .collect();
            let style = ShapeStyle::from(COLORS[k % COLORS.len()]).stroke_width(2);
            chart
                .draw_series(LineSeries::new(points, style))?
                .label(b.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        let target = ShapeStyle::from(BLACK.mix(0.5)).stroke_width(1);
        chart
            .draw_series(LineSeries::new(vec![(5.0, 0.0), (5.0, 1.05)], target))?
            .label("target: 5 rounds")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], target));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;

        let rounds = a.rounds as usize;
        let mut corrupted = vec![0.0; rounds];
        let mut to_bad = vec![0.0; rounds];
        let mut steered = vec![0.0; rounds];
        for r in runs {
            for (i, s) in r.per_round.iter().enumerate().take(rounds) {
                corrupted[i] += s.corrupted;
                to_bad[i] += s.to_bad;
                steered[i] += s.steered;
            }
        }
        let pct = |v: &[f64]| -> Vec<(f64, f64)> {
            v.iter()
                .zip(&steered)
                .enumerate()
                .map(|(i, (x, s))| (i as f64, if *s > 0.0 { 100.0 * x / s } else { 0.0 }))
                .collect()
        };
        let bad_pct = pct(&to_bad);
        let corrupt_pct = pct(&corrupted);
        let y_max = bad_pct
            .iter()
            .chain(&corrupt_pct)
            .map(|p| p.1)
            .fold(0.1, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&right)
            .caption("steered requests per round, mean over seeds", font)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..a.rounds as f64, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc("% of steered requests")
            .draw()?;
        let s1 = ShapeStyle::from(COLORS[0]).stroke_width(2);
        chart
            .draw_series(LineSeries::new(bad_pct, s1))?
            .label("to bad peers")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], s1));
        let s2 = ShapeStyle::from(COLORS[3]).stroke_width(2);
        chart
            .draw_series(LineSeries::new(corrupt_pct, s2))?
            .label("answered with corrupted bytes")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], s2));
        let sy = ShapeStyle::from(BLACK.mix(0.5)).stroke_width(1);
        chart
            .draw_series(LineSeries::new(
                vec![
                    (f64::from(a.sybil_round), 0.0),
                    (f64::from(a.sybil_round), y_max),
                ],
                sy,
            ))?
            .label("Sybils join")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], sy));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("plotting {}: {e}", path.display()))
}

fn main() -> Result<()> {
    let a = Args::parse();
    a.validate()?;
    let started = Instant::now();
    let keys = a.keys.clone().unwrap_or_else(|| {
        a.out
            .parent()
            .map_or_else(|| PathBuf::from("trust-keys"), |d| d.join("trust-keys"))
    });
    let pool = identities(&keys, a.nodes + a.sybils())?;
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let seeds: Vec<u64> = (0..a.seeds).map(|i| a.first_seed + i).collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Result<RunResult>>> = Mutex::new(Vec::new());
    eprintln!(
        "sim trust: {} seeds × {} rounds, {} nodes (+{} Sybils), {threads} threads",
        a.seeds,
        a.rounds,
        a.nodes,
        a.sybils()
    );
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&seed) = seeds.get(i) else { break };
                    let r = Sim::new(&a, seed, &pool).map(Sim::run);
                    if let Ok(run) = &r {
                        let max = run.rounds.iter().map(|x| x.1).max().unwrap_or(0);
                        eprintln!(
                            "seed {seed}: max rounds to isolate {max}{}, honest isolated {}, corrupted {:.5} %",
                            if run.unisolated.is_empty() {
                                String::new()
                            } else {
                                format!(" ({} never isolated)", run.unisolated.len())
                            },
                            run.honest_isolated,
                            if run.steered > 0.0 { 100.0 * run.corrupted / run.steered } else { 0.0 }
                        );
                    }
                    results
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(r);
                }
            });
        }
    });
    let mut runs = Vec::new();
    for r in results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        runs.push(r?);
    }
    runs.sort_by_key(|r| r.seed);
    let elapsed = started.elapsed().as_secs_f64();
    let (doc, t) = report(&a, &runs, elapsed);
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&a.out, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", a.out.display()))?;
    let svg = a
        .plot
        .clone()
        .unwrap_or_else(|| a.out.with_extension("svg"));
    plot(&svg, &a, &runs)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "seeds": runs.len(),
            "max_rounds_to_isolate": t.max_rounds,
            "honest_isolated": t.honest_isolated,
            "corrupted_fraction": t.corrupted_fraction,
        }))?
    );
    eprintln!(
        "wrote {} and {} in {elapsed:.1} s",
        a.out.display(),
        svg.display()
    );
    Ok(())
}
