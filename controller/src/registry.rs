//! The registry: this node's own advertisement and the verified advertisements learned from
//! peers, with each peer's liveness as membership gossip sees it.
//!
//! Nothing enters the registry without [`proto::open_advertisement`] having checked its
//! signature, its node id (the SHA-256 of the key that signed it) and its expiry, so whoever
//! relayed an advertisement (gossip is unauthenticated UDP) cannot change what it says. Per
//! node only the highest sequence is kept. With a [`Store`], every change is written through
//! (one transaction each) and the adverts are loaded (and verified again) at start.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use prost::Message;
use serde::Serialize;
use tokio::sync::watch;

pub use crate::store::Liveness;
use crate::{
    model::{Fingerprint, TrustLevel, UnixMs},
    proto::{self, ProtoError, pb},
    store::{PeerRecord, Store, StoreError},
};

/// The most nodes the registry tracks (adverts and liveness). A flood of freshly generated
/// keys (anyone can make one and sign an advert with it) stops here.
pub const MAX_NODES: usize = 4096;

/// How long a dead node's entry (liveness and last sequence, no advert) is kept by
/// [`Registry::expire`] before it is forgotten, unless [`Registry::set_dead_grace_ms`] says
/// otherwise.
pub const DEFAULT_DEAD_GRACE_MS: i64 = 10 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("advertisement refused: {0}")]
    Invalid(#[from] ProtoError),
    #[error("advertisement of node {advert} arrived as node {expected}'s")]
    WrongNode {
        expected: Fingerprint,
        advert: Fingerprint,
    },
    #[error("advertisement refused: the registry already tracks {MAX_NODES} nodes")]
    Full,
    #[error("registry: {0}")]
    Store(#[from] StoreError),
}

/// A peer that negotiation may ask for an offer: alive, with an unexpired advert.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub fingerprint: Fingerprint,
    /// The verified advertisement.
    pub advert: pb::Advertisement,
    /// Mean score of the reputation reports the store holds about it; `None` without any.
    pub reputation_ppm: Option<u32>,
    /// The trust the store recorded when the peer was admitted; gossip alone gives
    /// [`TrustLevel::FirstContact`] (the lowest), never more.
    pub trust: TrustLevel,
}

/// A verified advertisement as received.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnedAdvert {
    pub advert: pb::Advertisement,
    /// Exactly as signed (and as it travels in gossip).
    pub signed: pb::SignedAdvertisement,
    pub received_ms: UnixMs,
}

impl LearnedAdvert {
    pub fn expires_at_ms(&self) -> UnixMs {
        self.advert.expires_at_ms
    }
}

#[derive(Debug, Clone)]
struct Entry {
    advert: Option<LearnedAdvert>,
    /// Highest sequence verified, kept after the advert is removed (no rollback to an older
    /// advertisement a relay replays).
    last_sequence: Option<u64>,
    liveness: Liveness,
    since_ms: UnixMs,
}

#[derive(Debug)]
struct Inner {
    own: Option<LearnedAdvert>,
    nodes: HashMap<Fingerprint, Entry>,
    dead_grace_ms: i64,
}

/// The registry. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct Registry {
    self_id: Fingerprint,
    inner: Arc<RwLock<Inner>>,
    store: Option<Store>,
    changed: Arc<watch::Sender<u64>>,
}

/// One node as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeSnapshot {
    pub fingerprint: Fingerprint,
    pub liveness: Liveness,
    /// When `liveness` last changed.
    pub liveness_since_ms: UnixMs,
    /// The fields below are empty/`None` when the node has no current advert.
    pub name: String,
    pub organisation: String,
    pub control: String,
    pub gossip: String,
    pub regions: Vec<String>,
    pub modes: Vec<String>,
    pub spare_new_connections_per_s: Option<u32>,
    pub spare_egress_mbps: Option<u32>,
    pub spare_storage_bytes: Option<u64>,
    pub measured_at_ms: Option<UnixMs>,
    pub sequence: Option<u64>,
    pub received_ms: Option<UnixMs>,
    pub expires_at_ms: Option<UnixMs>,
}

/// Everything the registry holds, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegistrySnapshot {
    pub own: Option<NodeSnapshot>,
    /// By fingerprint.
    pub nodes: Vec<NodeSnapshot>,
}

impl Registry {
    /// An in-memory registry for the node `self_id` (its own adverts are never "learned").
    pub fn new(self_id: Fingerprint) -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            self_id,
            inner: Arc::new(RwLock::new(Inner {
                own: None,
                nodes: HashMap::new(),
                dead_grace_ms: DEFAULT_DEAD_GRACE_MS,
            })),
            store: None,
            changed: Arc::new(changed),
        }
    }

    /// A registry that writes through to `store` and starts from the adverts stored there.
    /// Each is verified again; expired or no longer valid ones are deleted. Loaded nodes start
    /// as [`Liveness::Suspect`]: nothing has confirmed them alive since the restart.
    pub fn with_store(
        self_id: Fingerprint,
        store: Store,
        now: UnixMs,
    ) -> Result<Self, RegistryError> {
        let mut registry = Self::new(self_id);
        store.delete_expired_adverts(now)?;
        let mut nodes = HashMap::new();
        for record in store.adverts()? {
            let opened = pb::SignedAdvertisement::decode(record.signed.as_slice())
                .map_err(|e| ProtoError::Decode {
                    what: "stored advertisement",
                    reason: e.to_string(),
                })
                .and_then(|signed| Ok((proto::open_advertisement(&signed, now)?, signed)));
            match opened {
                Ok((advert, signed))
                    if advert.node_id == record.node_id.0 && record.node_id != self_id =>
                {
                    nodes.insert(
                        record.node_id,
                        Entry {
                            last_sequence: Some(advert.sequence),
                            advert: Some(LearnedAdvert {
                                advert,
                                signed,
                                received_ms: record.received_ms,
                            }),
                            liveness: Liveness::Suspect,
                            since_ms: now,
                        },
                    );
                }
                Ok(_) => {
                    store.delete_advert(&record.node_id)?;
                }
                Err(error) => {
                    tracing::warn!(node.id = %record.node_id, %error, "dropping a stored advertisement");
                    store.delete_advert(&record.node_id)?;
                }
            }
            if nodes.len() >= MAX_NODES {
                break;
            }
        }
        registry.store = Some(store);
        registry.write().nodes = nodes;
        Ok(registry)
    }

    /// How long [`Registry::expire`] keeps dead nodes' entries.
    pub fn set_dead_grace_ms(&self, grace_ms: i64) {
        self.write().dead_grace_ms = grace_ms.max(0);
    }

    pub fn self_id(&self) -> Fingerprint {
        self.self_id
    }

    /// Fires (the value counts changes) whenever an advert or a liveness changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records this node's own signed advertisement (what discovery gossips).
    pub fn set_own(&self, advert: pb::Advertisement, signed: pb::SignedAdvertisement, now: UnixMs) {
        self.write().own = Some(LearnedAdvert {
            advert,
            signed,
            received_ms: now,
        });
        self.notify();
    }

    pub fn own(&self) -> Option<LearnedAdvert> {
        self.read().own.clone()
    }

    /// Verifies `signed` and keeps it if its sequence is newer than what the registry has.
    /// `Ok(false)`: valid but not newer (or this node's own).
    pub fn insert(
        &self,
        signed: &pb::SignedAdvertisement,
        now: UnixMs,
    ) -> Result<bool, RegistryError> {
        self.insert_checked(None, signed, now)
    }

    /// As [`Registry::insert`], but the advert must be `node`'s: gossip carries adverts under a
    /// node id, and a node may only publish its own.
    pub fn insert_for(
        &self,
        node: &Fingerprint,
        signed: &pb::SignedAdvertisement,
        now: UnixMs,
    ) -> Result<bool, RegistryError> {
        self.insert_checked(Some(node), signed, now)
    }

    fn insert_checked(
        &self,
        expected: Option<&Fingerprint>,
        signed: &pb::SignedAdvertisement,
        now: UnixMs,
    ) -> Result<bool, RegistryError> {
        let advert = proto::open_advertisement(signed, now)?;
        let fingerprint =
            Fingerprint::from_slice(&advert.node_id).map_err(|e| ProtoError::Field {
                field: "node_id".to_owned(),
                reason: e.to_string(),
            })?;
        if let Some(expected) = expected
            && *expected != fingerprint
        {
            return Err(RegistryError::WrongNode {
                expected: *expected,
                advert: fingerprint,
            });
        }
        if fingerprint == self.self_id {
            return Ok(false);
        }
        let mut inner = self.write();
        let newer = match inner.nodes.get(&fingerprint) {
            None => {
                if inner.nodes.len() >= MAX_NODES {
                    return Err(RegistryError::Full);
                }
                true
            }
            Some(entry) => match (&entry.advert, entry.last_sequence) {
                (Some(current), _) => advert.sequence > current.advert.sequence,
                // Removed (dead or expired): the same advert may come back, an older one not.
                (None, Some(last)) => advert.sequence >= last,
                (None, None) => true,
            },
        };
        if !newer {
            return Ok(false);
        }
        if let Some(store) = &self.store {
            store.put_advert(
                &fingerprint,
                advert.sequence,
                &signed.encode_to_vec(),
                now,
                advert.expires_at_ms,
            )?;
            let existing = store.peer(&fingerprint)?;
            store.upsert_peer(&PeerRecord {
                fingerprint,
                name: advert.name.clone(),
                organisation: (!advert.organisation.is_empty())
                    .then(|| advert.organisation.clone()),
                trust: existing
                    .as_ref()
                    .map_or(TrustLevel::FirstContact, |p| p.trust),
                liveness: existing.as_ref().map_or(Liveness::Alive, |p| p.liveness),
                liveness_ms: existing.as_ref().map_or(now, |p| p.liveness_ms),
                control_endpoint: advert
                    .endpoints
                    .as_ref()
                    .map(|e| e.control.clone())
                    .unwrap_or_default(),
                first_seen_ms: now,
                last_seen_ms: now,
                pinned_spki: advert.public_key.clone(),
            })?;
        }
        let entry = inner.nodes.entry(fingerprint).or_insert(Entry {
            advert: None,
            last_sequence: None,
            liveness: Liveness::Alive,
            since_ms: now,
        });
        entry.last_sequence = Some(advert.sequence);
        entry.advert = Some(LearnedAdvert {
            advert,
            signed: signed.clone(),
            received_ms: now,
        });
        drop(inner);
        self.notify();
        Ok(true)
    }

    /// The current advert of `fingerprint`, if any (expired ones until [`Registry::expire`]).
    pub fn get(&self, fingerprint: &Fingerprint) -> Option<LearnedAdvert> {
        self.read().nodes.get(fingerprint)?.advert.clone()
    }

    /// The liveness of `fingerprint` and since when.
    pub fn liveness(&self, fingerprint: &Fingerprint) -> Option<(Liveness, UnixMs)> {
        self.read()
            .nodes
            .get(fingerprint)
            .map(|e| (e.liveness, e.since_ms))
    }

    /// Records a liveness change (`Ok(false)` if it did not change). A dead node's advert is
    /// removed; its entry stays until [`Registry::expire`] forgets it.
    pub fn set_liveness(
        &self,
        fingerprint: &Fingerprint,
        liveness: Liveness,
        now: UnixMs,
    ) -> Result<bool, RegistryError> {
        if *fingerprint == self.self_id {
            return Ok(false);
        }
        let mut inner = self.write();
        match inner.nodes.get(fingerprint) {
            Some(entry) if entry.liveness == liveness => return Ok(false),
            None if inner.nodes.len() >= MAX_NODES => return Err(RegistryError::Full),
            _ => {}
        }
        let drop_advert = liveness == Liveness::Dead;
        if let Some(store) = &self.store {
            store.set_liveness(fingerprint, liveness, now)?;
            if drop_advert {
                store.delete_advert(fingerprint)?;
            }
        }
        let entry = inner.nodes.entry(*fingerprint).or_insert(Entry {
            advert: None,
            last_sequence: None,
            liveness,
            since_ms: now,
        });
        entry.liveness = liveness;
        entry.since_ms = now;
        if drop_advert {
            entry.advert = None;
        }
        drop(inner);
        tracing::debug!(node.id = %fingerprint, liveness = liveness.as_str(), "liveness");
        self.notify();
        Ok(true)
    }

    /// Peers that negotiation may ask: alive, advert unexpired at `now`, not this node. Ordered
    /// by reputation (unknown last), then spare new connections per second, then fingerprint.
    pub fn candidates(&self, now: UnixMs) -> Vec<Candidate> {
        let live: Vec<(Fingerprint, pb::Advertisement)> = self
            .read()
            .nodes
            .iter()
            .filter(|(_, e)| e.liveness == Liveness::Alive)
            .filter_map(|(fp, e)| {
                let learned = e.advert.as_ref()?;
                (learned.advert.expires_at_ms > now).then(|| (*fp, learned.advert.clone()))
            })
            .collect();
        let mut candidates: Vec<Candidate> = live
            .into_iter()
            .map(|(fingerprint, advert)| {
                let (reputation_ppm, trust) = self.peer_facts(&fingerprint);
                Candidate {
                    fingerprint,
                    advert,
                    reputation_ppm,
                    trust,
                }
            })
            .collect();
        candidates.sort_by(|a, b| {
            let spare = |c: &Candidate| c.advert.spare.map_or(0, |s| s.new_connections_per_s);
            b.reputation_ppm
                .cmp(&a.reputation_ppm)
                .then(spare(b).cmp(&spare(a)))
                .then(a.fingerprint.cmp(&b.fingerprint))
        });
        candidates
    }

    /// Reputation (mean of the stored reports) and trust from the store; without a store or
    /// on a store error: unknown reputation, lowest trust.
    fn peer_facts(&self, fingerprint: &Fingerprint) -> (Option<u32>, TrustLevel) {
        let Some(store) = &self.store else {
            return (None, TrustLevel::FirstContact);
        };
        let reputation = match store.reputation_of(fingerprint) {
            Ok(reports) if !reports.is_empty() => {
                let sum: u64 = reports.iter().map(|r| u64::from(r.score_ppm)).sum();
                u32::try_from(sum / reports.len() as u64).ok()
            }
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(node.id = %fingerprint, %error, "reading reputation");
                None
            }
        };
        let trust = match store.peer(fingerprint) {
            Ok(peer) => peer.map_or(TrustLevel::FirstContact, |p| p.trust),
            Err(error) => {
                tracing::warn!(node.id = %fingerprint, %error, "reading peer");
                TrustLevel::FirstContact
            }
        };
        (reputation, trust)
    }

    /// How many other nodes are alive with an unexpired advert at `now`.
    pub fn known(&self, now: UnixMs) -> usize {
        self.read()
            .nodes
            .values()
            .filter(|e| e.liveness == Liveness::Alive)
            .filter(|e| {
                e.advert
                    .as_ref()
                    .is_some_and(|a| a.advert.expires_at_ms > now)
            })
            .count()
    }

    /// Every node the registry tracks (adverts or liveness), this node excluded.
    pub fn nodes(&self) -> Vec<Fingerprint> {
        self.read().nodes.keys().copied().collect()
    }

    /// Removes adverts expired at `now` and forgets nodes dead for longer than the grace
    /// period. Returns how many adverts and entries were removed.
    pub fn expire(&self, now: UnixMs) -> Result<usize, RegistryError> {
        let mut inner = self.write();
        if let Some(store) = &self.store {
            store.delete_expired_adverts(now)?;
        }
        let grace = inner.dead_grace_ms;
        let mut removed = 0;
        inner.nodes.retain(|_, entry| {
            if entry
                .advert
                .as_ref()
                .is_some_and(|a| a.advert.expires_at_ms <= now)
            {
                entry.advert = None;
                removed += 1;
            }
            let forget = entry.liveness == Liveness::Dead
                && entry.advert.is_none()
                && now.saturating_sub(entry.since_ms) > grace;
            if forget {
                removed += 1;
            }
            !forget
        });
        drop(inner);
        if removed > 0 {
            self.notify();
        }
        Ok(removed)
    }

    /// Everything, for the admin API.
    pub fn snapshot(&self) -> RegistrySnapshot {
        let inner = self.read();
        let own = inner
            .own
            .as_ref()
            .map(|own| node_snapshot(self.self_id, Liveness::Alive, own.received_ms, Some(own)));
        let mut nodes: Vec<NodeSnapshot> = inner
            .nodes
            .iter()
            .map(|(fp, e)| node_snapshot(*fp, e.liveness, e.since_ms, e.advert.as_ref()))
            .collect();
        nodes.sort_by_key(|n| n.fingerprint);
        RegistrySnapshot { own, nodes }
    }
}

fn mode_name(mode: i32) -> String {
    pb::RedirectionMode::try_from(mode).map_or_else(
        |_| format!("unknown-{mode}"),
        |m| match m {
            pb::RedirectionMode::DsrGue => "dsr-gue".to_owned(),
            pb::RedirectionMode::DsrIpip => "dsr-ipip".to_owned(),
            pb::RedirectionMode::HttpRedirect => "http-redirect".to_owned(),
            pb::RedirectionMode::Unspecified => "unspecified".to_owned(),
        },
    )
}

fn node_snapshot(
    fingerprint: Fingerprint,
    liveness: Liveness,
    since_ms: UnixMs,
    learned: Option<&LearnedAdvert>,
) -> NodeSnapshot {
    let ad = learned.map(|l| &l.advert);
    let endpoints = ad.and_then(|a| a.endpoints.as_ref());
    let spare = ad.and_then(|a| a.spare.as_ref());
    NodeSnapshot {
        fingerprint,
        liveness,
        liveness_since_ms: since_ms,
        name: ad.map(|a| a.name.clone()).unwrap_or_default(),
        organisation: ad.map(|a| a.organisation.clone()).unwrap_or_default(),
        control: endpoints.map(|e| e.control.clone()).unwrap_or_default(),
        gossip: endpoints.map(|e| e.gossip.clone()).unwrap_or_default(),
        regions: ad
            .and_then(|a| a.footprint.as_ref())
            .map(|f| f.regions.clone())
            .unwrap_or_default(),
        modes: ad
            .map(|a| a.modes.iter().copied().map(mode_name).collect())
            .unwrap_or_default(),
        spare_new_connections_per_s: spare.map(|s| s.new_connections_per_s),
        spare_egress_mbps: spare.map(|s| s.egress_mbps),
        spare_storage_bytes: spare.map(|s| s.storage_bytes),
        measured_at_ms: ad.map(|a| a.measured_at_ms),
        sequence: ad.map(|a| a.sequence),
        received_ms: learned.map(|l| l.received_ms),
        expires_at_ms: ad.map(|a| a.expires_at_ms),
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;
    use crate::{identity::NodeIdentity, model::now_ms};

    fn node(name: &str) -> NodeIdentity {
        NodeIdentity::generate(name, "Example Org", &[]).unwrap()
    }

    fn advert(id: &NodeIdentity, sequence: u64, expires_at_ms: UnixMs) -> pb::SignedAdvertisement {
        let ad = pb::Advertisement {
            name: "peer".into(),
            organisation: "Example Org".into(),
            endpoints: Some(pb::Endpoints {
                control: "127.0.0.1:7443".into(),
                ..Default::default()
            }),
            modes: vec![pb::RedirectionMode::DsrGue as i32],
            spare: Some(pb::Capacity {
                new_connections_per_s: 1000,
                egress_mbps: 100,
                storage_bytes: 0,
            }),
            measured_at_ms: now_ms(),
            sequence,
            expires_at_ms,
            ..Default::default()
        };
        proto::sign_advertisement(id, &ad)
    }

    #[test]
    fn keeps_only_newer_sequences_and_refuses_forgeries() {
        let me = node("me");
        let peer = node("peer");
        let registry = Registry::new(me.fingerprint);
        let now = now_ms();
        assert!(
            registry
                .insert(&advert(&peer, 5, now + 60_000), now)
                .unwrap()
        );
        assert!(
            !registry
                .insert(&advert(&peer, 4, now + 60_000), now)
                .unwrap()
        );
        assert!(
            !registry
                .insert(&advert(&peer, 5, now + 60_000), now)
                .unwrap()
        );
        assert!(
            registry
                .insert(&advert(&peer, 6, now + 60_000), now)
                .unwrap()
        );
        assert_eq!(registry.get(&peer.fingerprint).unwrap().advert.sequence, 6);

        let mut tampered = advert(&peer, 7, now + 60_000);
        tampered.signature[0] ^= 1;
        assert!(matches!(
            registry.insert(&tampered, now),
            Err(RegistryError::Invalid(ProtoError::BadSignature { .. }))
        ));
        let unsigned = pb::SignedAdvertisement {
            advertisement: advert(&peer, 8, now + 60_000).advertisement,
            signature: Vec::new(),
        };
        assert!(registry.insert(&unsigned, now).is_err());
        // Published under another node's id.
        let other = node("other");
        assert!(matches!(
            registry.insert_for(&other.fingerprint, &advert(&peer, 9, now + 60_000), now),
            Err(RegistryError::WrongNode { .. })
        ));
        assert_eq!(registry.get(&peer.fingerprint).unwrap().advert.sequence, 6);
        assert!(registry.get(&other.fingerprint).is_none());
        // Expired on arrival.
        assert!(registry.insert(&advert(&other, 1, now - 1), now).is_err());
        // Its own advert is never learned.
        assert!(!registry.insert(&advert(&me, 1, now + 60_000), now).unwrap());
        assert!(
            registry
                .candidates(now)
                .iter()
                .all(|c| c.fingerprint != me.fingerprint)
        );
    }

    #[test]
    fn candidates_are_alive_and_unexpired_and_dead_adverts_go() {
        let me = node("me");
        let (a, b) = (node("a"), node("b"));
        let registry = Registry::new(me.fingerprint);
        let mut changes = registry.subscribe();
        let now = now_ms();
        registry.insert(&advert(&a, 1, now + 60_000), now).unwrap();
        registry.insert(&advert(&b, 1, now + 1_000), now).unwrap();
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(registry.candidates(now).len(), 2);
        assert_eq!(
            registry.candidates(now + 1_000).len(),
            1,
            "b's advert expired"
        );

        assert!(
            registry
                .set_liveness(&a.fingerprint, Liveness::Suspect, now)
                .unwrap()
        );
        assert!(changes.has_changed().unwrap());
        assert!(
            !registry
                .set_liveness(&a.fingerprint, Liveness::Suspect, now)
                .unwrap()
        );
        assert!(
            registry
                .candidates(now)
                .iter()
                .all(|c| c.fingerprint != a.fingerprint)
        );
        registry
            .set_liveness(&a.fingerprint, Liveness::Dead, now)
            .unwrap();
        assert!(
            registry.get(&a.fingerprint).is_none(),
            "a dead node's advert is removed"
        );
        // A replay of an older advert cannot come back; the same one can once it lives again.
        registry
            .set_liveness(&a.fingerprint, Liveness::Alive, now)
            .unwrap();
        assert!(registry.insert(&advert(&a, 1, now + 60_000), now).unwrap());

        assert_eq!(registry.expire(now + 1_000).unwrap(), 1);
        assert!(registry.get(&b.fingerprint).is_none());
        registry.set_dead_grace_ms(100);
        registry
            .set_liveness(&b.fingerprint, Liveness::Dead, now)
            .unwrap();
        registry.expire(now + 2_000).unwrap();
        assert!(
            registry.liveness(&b.fingerprint).is_none(),
            "forgotten after the grace"
        );
        assert_eq!(registry.snapshot().nodes.len(), 1);
    }

    #[test]
    fn persists_through_the_store_and_reloads_verified() {
        let me = node("me");
        let (a, b) = (node("a"), node("b"));
        let store = Store::open_in_memory().unwrap();
        let now = now_ms();
        {
            let registry = Registry::with_store(me.fingerprint, store.clone(), now).unwrap();
            registry.insert(&advert(&a, 3, now + 60_000), now).unwrap();
            registry.insert(&advert(&b, 1, now + 60_000), now).unwrap();
            registry
                .set_liveness(&b.fingerprint, Liveness::Dead, now)
                .unwrap();
        }
        let peer = store.peer(&a.fingerprint).unwrap().unwrap();
        assert_eq!(peer.trust, TrustLevel::FirstContact);
        assert_eq!(peer.pinned_spki, a.spki_der);
        assert_eq!(
            store.peer(&b.fingerprint).unwrap().unwrap().liveness,
            Liveness::Dead
        );
        assert_eq!(
            store.adverts().unwrap().len(),
            1,
            "the dead node's advert is deleted"
        );

        let reloaded = Registry::with_store(me.fingerprint, store.clone(), now).unwrap();
        let learned = reloaded.get(&a.fingerprint).unwrap();
        assert_eq!(learned.advert.sequence, 3);
        assert_eq!(
            reloaded.liveness(&a.fingerprint).unwrap().0,
            Liveness::Suspect
        );
        assert!(
            reloaded.candidates(now).is_empty(),
            "not confirmed alive since the restart"
        );
        // An expired stored advert is dropped at load.
        let later = Registry::with_store(me.fingerprint, store.clone(), now + 120_000).unwrap();
        assert!(later.get(&a.fingerprint).is_none());
        assert!(store.adverts().unwrap().is_empty());
    }
}
