//! Counters summed across CPUs, in the JSON shape of `p2pcdn-redirector stats --json`.

use std::net::IpAddr;

use redirector_ebpf::{DecapStats, GlobalStats, PeerStats, ServiceStats};
use serde::{Deserialize, Serialize};

/// Everything `stats` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub global: GlobalCounters,
    pub services: Vec<ServiceCounters>,
    pub peers: Vec<PeerCounters>,
    /// Per allowed sender (`DECAP_ALLOW`), by address. Absent in the output of builds before
    /// schema 3, hence the default.
    #[serde(default)]
    pub decap: Vec<DecapCounters>,
}

/// Events that belong to no service (`GLOBAL_STATS`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalCounters {
    pub unparsed: u64,
    pub decap_pkts: u64,
    pub decap_bytes: u64,
    pub decap_denied: u64,
    pub fib_no_neigh: u64,
    pub fib_failed: u64,
    pub encap_failed: u64,
    pub stale_peer: u64,
}

/// One service's counters (`SVC_STATS[id]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCounters {
    pub name: String,
    pub id: u32,
    pub syn_local: u64,
    pub syn_steered: u64,
    pub kept_local: u64,
    pub pkts_local: u64,
    pub bytes_local: u64,
    pub pkts_steered: u64,
    pub bytes_steered: u64,
    pub flow_misses: u64,
    pub guard_drops: u64,
    pub ceiling_hits: u64,
}

/// One peer's counters (`PEER_STATS[slot]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounters {
    pub name: String,
    pub slot: u32,
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
    pub no_token: u64,
}

/// What this node decapsulated from one allowed sender (`DECAP_ALLOW[sender]`): the peer
/// side of accounting. `bytes` are inner IP packets (header and payload, no outer headers),
/// the measure of the primary's `PeerCounters::bytes`, so for the primary whose tunnel source
/// is `addr` the two agree exactly barring loss.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecapCounters {
    pub addr: IpAddr,
    pub packets: u64,
    pub bytes: u64,
}

/// Sums per-CPU values. Counters wrap like the kernel's, so deltas stay right.
pub fn sum_global<'a>(per_cpu: impl IntoIterator<Item = &'a GlobalStats>) -> GlobalCounters {
    let mut out = GlobalCounters::default();
    for c in per_cpu {
        out.unparsed = out.unparsed.wrapping_add(c.unparsed);
        out.decap_pkts = out.decap_pkts.wrapping_add(c.decap_pkts);
        out.decap_bytes = out.decap_bytes.wrapping_add(c.decap_bytes);
        out.decap_denied = out.decap_denied.wrapping_add(c.decap_denied);
        out.fib_no_neigh = out.fib_no_neigh.wrapping_add(c.fib_no_neigh);
        out.fib_failed = out.fib_failed.wrapping_add(c.fib_failed);
        out.encap_failed = out.encap_failed.wrapping_add(c.encap_failed);
        out.stale_peer = out.stale_peer.wrapping_add(c.stale_peer);
    }
    out
}

/// Sums one service's per-CPU values.
pub fn sum_service<'a>(
    name: String,
    id: u32,
    per_cpu: impl IntoIterator<Item = &'a ServiceStats>,
) -> ServiceCounters {
    let mut out = ServiceCounters {
        name,
        id,
        ..ServiceCounters::default()
    };
    for c in per_cpu {
        out.syn_local = out.syn_local.wrapping_add(c.syn_local);
        out.syn_steered = out.syn_steered.wrapping_add(c.syn_steered);
        out.kept_local = out.kept_local.wrapping_add(c.kept_local);
        out.pkts_local = out.pkts_local.wrapping_add(c.pkts_local);
        out.bytes_local = out.bytes_local.wrapping_add(c.bytes_local);
        out.pkts_steered = out.pkts_steered.wrapping_add(c.pkts_steered);
        out.bytes_steered = out.bytes_steered.wrapping_add(c.bytes_steered);
        out.flow_misses = out.flow_misses.wrapping_add(c.flow_misses);
        out.guard_drops = out.guard_drops.wrapping_add(c.guard_drops);
        out.ceiling_hits = out.ceiling_hits.wrapping_add(c.ceiling_hits);
    }
    out
}

/// Sums one peer's per-CPU values.
pub fn sum_peer<'a>(
    name: String,
    slot: u32,
    per_cpu: impl IntoIterator<Item = &'a PeerStats>,
) -> PeerCounters {
    let mut out = PeerCounters {
        name,
        slot,
        ..PeerCounters::default()
    };
    for c in per_cpu {
        out.connections = out.connections.wrapping_add(c.connections);
        out.packets = out.packets.wrapping_add(c.packets);
        out.bytes = out.bytes.wrapping_add(c.bytes);
        out.no_token = out.no_token.wrapping_add(c.no_token);
    }
    out
}

/// Sums one sender's per-CPU decapsulation counters.
pub fn sum_decap<'a>(
    addr: IpAddr,
    per_cpu: impl IntoIterator<Item = &'a DecapStats>,
) -> DecapCounters {
    let mut out = DecapCounters {
        addr,
        packets: 0,
        bytes: 0,
    };
    for c in per_cpu {
        out.packets = out.packets.wrapping_add(c.pkts);
        out.bytes = out.bytes.wrapping_add(c.bytes);
    }
    out
}

/// Per-second rate of a counter between two readings `secs` apart (0 if it went backwards,
/// i.e. the service or peer was replaced in between).
pub fn rate(before: u64, after: u64, secs: f64) -> f64 {
    if secs <= 0.0 || after < before {
        return 0.0;
    }
    (after - before) as f64 / secs
}

impl Stats {
    /// The service named `name`, if present.
    pub fn service(&self, name: &str) -> Option<&ServiceCounters> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The peer named `name`, if present.
    pub fn peer(&self, name: &str) -> Option<&PeerCounters> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// What was decapsulated from `addr`, if it is an allowed sender.
    pub fn decap_from(&self, addr: IpAddr) -> Option<&DecapCounters> {
        self.decap.iter().find(|d| d.addr == addr)
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_values_are_summed() {
        let cpus = [
            ServiceStats {
                syn_local: 3,
                bytes_steered: 1000,
                ceiling_hits: 1,
                ..ServiceStats::default()
            },
            ServiceStats {
                syn_local: 4,
                bytes_steered: 24,
                guard_drops: 2,
                ..ServiceStats::default()
            },
        ];
        let s = sum_service("web".into(), 2, &cpus);
        assert_eq!(
            (s.syn_local, s.bytes_steered, s.guard_drops, s.ceiling_hits),
            (7, 1024, 2, 1)
        );
        assert_eq!((s.name.as_str(), s.id), ("web", 2));

        let peers = [
            PeerStats {
                connections: 1,
                bytes: 10,
                ..PeerStats::default()
            },
            PeerStats {
                connections: 2,
                no_token: 5,
                ..PeerStats::default()
            },
        ];
        let p = sum_peer("p".into(), 9, &peers);
        assert_eq!((p.connections, p.bytes, p.no_token), (3, 10, 5));

        let global = [
            GlobalStats {
                unparsed: 1,
                stale_peer: 2,
                ..GlobalStats::default()
            },
            GlobalStats {
                unparsed: u64::MAX,
                ..GlobalStats::default()
            },
        ];
        let g = sum_global(&global);
        assert_eq!(g.unparsed, 0, "wraps like the kernel counters");
        assert_eq!(g.stale_peer, 2);

        let addr: IpAddr = "2001:db8::10".parse().unwrap();
        let decap = [
            DecapStats {
                pkts: 2,
                bytes: 120,
            },
            DecapStats {
                pkts: u64::MAX,
                bytes: 1500,
            },
        ];
        let d = sum_decap(addr, &decap);
        assert_eq!(d.addr, addr);
        assert_eq!(
            (d.packets, d.bytes),
            (1, 1620),
            "packets wrap like the kernel counters"
        );
    }

    #[test]
    fn json_uses_the_contract_field_names() {
        let stats = Stats {
            global: GlobalCounters::default(),
            services: vec![ServiceCounters {
                name: "web".into(),
                ..ServiceCounters::default()
            }],
            peers: vec![PeerCounters::default()],
            decap: vec![DecapCounters {
                addr: "192.0.2.10".parse().unwrap(),
                packets: 2,
                bytes: 120,
            }],
        };
        let json = serde_json::to_value(&stats).unwrap();
        let global: Vec<&str> = json["global"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "unparsed",
            "decap_pkts",
            "decap_bytes",
            "decap_denied",
            "fib_no_neigh",
            "fib_failed",
            "encap_failed",
            "stale_peer",
        ];
        let mut got = global.clone();
        got.sort_unstable();
        expected.sort_unstable();
        assert_eq!(got, expected);
        let service = json["services"][0].as_object().unwrap();
        for key in [
            "name",
            "id",
            "syn_local",
            "syn_steered",
            "kept_local",
            "pkts_local",
            "bytes_local",
            "pkts_steered",
            "bytes_steered",
            "flow_misses",
            "guard_drops",
            "ceiling_hits",
        ] {
            assert!(service.contains_key(key), "{key}");
        }
        assert_eq!(service.len(), 12);
        let peer = json["peers"][0].as_object().unwrap();
        for key in [
            "name",
            "slot",
            "connections",
            "packets",
            "bytes",
            "no_token",
        ] {
            assert!(peer.contains_key(key), "{key}");
        }
        assert_eq!(peer.len(), 6);
        assert_eq!(
            json["decap"],
            serde_json::json!([{"addr": "192.0.2.10", "packets": 2, "bytes": 120}]),
            "decap: one object per sender with the contract's field names"
        );
        // The output of a build before per-sender counters still reads back.
        let old: Stats = serde_json::from_str(
            r#"{"global":{"unparsed":0,"decap_pkts":0,"decap_bytes":0,"decap_denied":0,
            "fib_no_neigh":0,"fib_failed":0,"encap_failed":0,"stale_peer":0},
            "services":[],"peers":[]}"#,
        )
        .unwrap();
        assert!(old.decap.is_empty());
    }

    #[test]
    fn rates_come_from_deltas() {
        assert_eq!(rate(100, 300, 2.0), 100.0);
        assert_eq!(
            rate(300, 100, 2.0),
            0.0,
            "a reset counter is not a negative rate"
        );
        assert_eq!(rate(0, 10, 0.0), 0.0);
    }
}
