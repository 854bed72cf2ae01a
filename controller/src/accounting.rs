//! Accounting: each side's usage of an arrangement, reconciled, settled and exported.
//!
//! - **Counting.** Each side records its own cumulative counts in the usage ledger (source
//!   `local`) from its data plane: the primary the XDP counters of the arrangement's peer
//!   (connections steered, packets and bytes tunnelled), the provider what it received from
//!   the primary and served (see [`crate::steering::Steering::usage`]). Heartbeats carry the
//!   primary's counts to the provider and the answers carry the provider's back (source
//!   `peer`); the disband carries the final counts both ways.
//! - **Counters that restart.** A data plane that is re-created (a restart without pinned
//!   maps, a peer slot re-configured) counts from zero again; [`UsageCounter`] keeps the
//!   ledger cumulative across such resets.
//! - **Reconciliation.** [`LedgerRow`] puts both sides' final counts side by side with the
//!   discrepancy in percent (`|local − peer| / max(local, peer)`), and the settlement computed
//!   from the terms (`policy::settle`).
//! - **Export.** `p2pcdn ledger export --format json|csv` prints one row per arrangement.

use std::collections::HashMap;

use serde::Serialize;

use crate::{
    model::{Role, UnixMs},
    proto::pb,
    store::{ArrangementFilter, ArrangementRecord, Store, StoreError, UsageCounts},
};

/// One cumulative reading of a data-plane counter set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Reading {
    pub connections: u64,
    pub bytes: u64,
    pub packets: u64,
}

/// Makes readings of counters that may restart from zero into a cumulative series: when a
/// reading is below the previous one, the previous total becomes the base of what follows.
#[derive(Debug, Default)]
pub struct UsageCounter {
    series: HashMap<String, Series>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Series {
    base: Reading,
    last_raw: Reading,
}

impl UsageCounter {
    /// The cumulative total of `key` given its raw `reading`; `recorded` is the latest total
    /// already in the ledger (the base after a restart of this process).
    pub fn total(&mut self, key: &str, reading: Reading, recorded: Reading) -> Reading {
        let series = self.series.entry(key.to_owned()).or_insert_with(|| Series {
            // First reading in this process: counters that restarted (below the ledger)
            // continue from the ledger's total.
            base: if reading.connections < recorded.connections
                || reading.bytes < recorded.bytes
                || reading.packets < recorded.packets
            {
                recorded
            } else {
                Reading::default()
            },
            last_raw: Reading::default(),
        });
        if reading.connections < series.last_raw.connections
            || reading.bytes < series.last_raw.bytes
            || reading.packets < series.last_raw.packets
        {
            series.base = add(series.base, series.last_raw);
        }
        series.last_raw = reading;
        add(series.base, reading)
    }

    /// Forgets `key` (the arrangement ended).
    pub fn forget(&mut self, key: &str) {
        self.series.remove(key);
    }
}

fn add(a: Reading, b: Reading) -> Reading {
    Reading {
        connections: a.connections.saturating_add(b.connections),
        bytes: a.bytes.saturating_add(b.bytes),
        packets: a.packets.saturating_add(b.packets),
    }
}

impl From<UsageCounts> for Reading {
    fn from(c: UsageCounts) -> Self {
        Self {
            connections: c.connections,
            bytes: c.bytes,
            packets: c.packets,
        }
    }
}

/// `|a − b| / max(a, b)` in percent; 0 when both are 0.
pub fn discrepancy_percent(a: u64, b: u64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if hi == 0 {
        return 0.0;
    }
    #[expect(clippy::cast_precision_loss, reason = "a percentage")]
    let percent = (hi - lo) as f64 * 100.0 / hi as f64;
    percent
}

/// One arrangement in the ledger export.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerRow {
    pub arrangement: String,
    /// This node's side.
    pub role: &'static str,
    pub peer: String,
    pub service: String,
    pub state: &'static str,
    pub activated_ms: Option<UnixMs>,
    pub ended_ms: Option<UnixMs>,
    pub end_reason: String,
    pub local_connections: u64,
    pub local_bytes: u64,
    pub local_packets: u64,
    /// The counts are the final ones (sent or received with the disband).
    pub local_final: bool,
    pub peer_connections: u64,
    pub peer_bytes: u64,
    pub peer_packets: u64,
    pub peer_final: bool,
    pub connections_discrepancy_percent: f64,
    pub bytes_discrepancy_percent: f64,
    pub charges_micros: u64,
    pub credit_micros: u64,
    pub total_micros: u64,
    pub currency: String,
}

/// The ledger: one row per arrangement that was active (newest first), optionally one only.
pub fn ledger(store: &Store, only: Option<&str>) -> Result<Vec<LedgerRow>, StoreError> {
    let records = match only {
        Some(id) => store.arrangement(id)?.into_iter().collect(),
        None => store.arrangements(&ArrangementFilter {
            limit: Some(usize::MAX),
            ..ArrangementFilter::default()
        })?,
    };
    let mut rows = Vec::new();
    for a in records.into_iter().filter(|a| a.activated_ms.is_some()) {
        let (local, peer) = store.usage_totals(&a.id)?;
        rows.push(row(&a, local, peer));
    }
    Ok(rows)
}

fn row(a: &ArrangementRecord, local: UsageCounts, peer: UsageCounts) -> LedgerRow {
    let settlement = a.settlement.clone().unwrap_or_default();
    LedgerRow {
        arrangement: a.id.clone(),
        role: match a.role {
            Role::Primary => "primary",
            Role::Provider => "provider",
        },
        peer: a.peer.to_string(),
        service: a
            .service
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        state: crate::admin::StateView::from_pb(a.state).map_or("unspecified", |s| s.as_str()),
        activated_ms: a.activated_ms,
        ended_ms: a.ended_ms,
        end_reason: a.end_reason.clone().unwrap_or_default(),
        local_connections: local.connections,
        local_bytes: local.bytes,
        local_packets: local.packets,
        local_final: local.is_final,
        peer_connections: peer.connections,
        peer_bytes: peer.bytes,
        peer_packets: peer.packets,
        peer_final: peer.is_final,
        connections_discrepancy_percent: discrepancy_percent(local.connections, peer.connections),
        bytes_discrepancy_percent: discrepancy_percent(local.bytes, peer.bytes),
        charges_micros: settlement.charges_micros,
        credit_micros: settlement.credit_micros,
        total_micros: settlement.total_micros,
        currency: settlement.currency,
    }
}

/// The export formats of `p2pcdn ledger export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Csv,
}

/// The rows as a JSON array or as CSV with a header line.
pub fn export(rows: &[LedgerRow], format: Format) -> Result<String, String> {
    match format {
        Format::Json => serde_json::to_string_pretty(rows).map_err(|e| e.to_string()),
        Format::Csv => {
            let mut out = csv::Writer::from_writer(Vec::new());
            for r in rows {
                out.serialize(r).map_err(|e| e.to_string())?;
            }
            if rows.is_empty() {
                // The header alone, so a consumer always sees the columns.
                out.write_record(CSV_COLUMNS).map_err(|e| e.to_string())?;
            }
            let bytes = out.into_inner().map_err(|e| e.to_string())?;
            String::from_utf8(bytes).map_err(|e| e.to_string())
        }
    }
}

const CSV_COLUMNS: [&str; 22] = [
    "arrangement",
    "role",
    "peer",
    "service",
    "state",
    "activated_ms",
    "ended_ms",
    "end_reason",
    "local_connections",
    "local_bytes",
    "local_packets",
    "local_final",
    "peer_connections",
    "peer_bytes",
    "peer_packets",
    "peer_final",
    "connections_discrepancy_percent",
    "bytes_discrepancy_percent",
    "charges_micros",
    "credit_micros",
    "total_micros",
    "currency",
];

/// The usage message of a reading (heartbeats and disbands carry it).
pub fn to_pb(r: Reading, at_ms: UnixMs) -> pb::Usage {
    pb::Usage {
        connections: r.connections,
        bytes: r.bytes,
        packets: r.packets,
        measured_at_ms: at_ms,
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;

    fn r(c: u64, b: u64) -> Reading {
        Reading {
            connections: c,
            bytes: b,
            packets: c,
        }
    }

    #[test]
    fn counters_that_restart_stay_cumulative() {
        let mut u = UsageCounter::default();
        assert_eq!(u.total("a", r(10, 1000), Reading::default()), r(10, 1000));
        assert_eq!(u.total("a", r(15, 1500), Reading::default()), r(15, 1500));
        // The data plane lost its counters: what follows adds to what was counted.
        assert_eq!(u.total("a", r(2, 100), Reading::default()), r(17, 1600));
        assert_eq!(u.total("a", r(5, 400), Reading::default()), r(20, 1900));
        // Another arrangement is another series.
        assert_eq!(u.total("b", r(1, 1), Reading::default()), r(1, 1));
    }

    #[test]
    fn after_a_restart_the_ledger_is_the_base() {
        let mut u = UsageCounter::default();
        // Kernel counters survived (pinned maps): above the ledger, taken as they are.
        assert_eq!(u.total("a", r(30, 3000), r(20, 2000)), r(30, 3000));
        let mut u = UsageCounter::default();
        // Counters restarted with the process: continue from the ledger.
        assert_eq!(u.total("a", r(3, 300), r(20, 2000)), r(23, 2300));
    }

    #[test]
    fn discrepancy_is_relative_to_the_larger_count() {
        assert!((discrepancy_percent(0, 0)).abs() < f64::EPSILON);
        assert!((discrepancy_percent(1000, 990) - 1.0).abs() < 1e-9);
        assert!((discrepancy_percent(990, 1000) - 1.0).abs() < 1e-9);
        assert!((discrepancy_percent(0, 5) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn csv_has_a_header_and_quotes_what_needs_it() {
        let row = LedgerRow {
            arrangement: "a-1".to_owned(),
            role: "primary",
            peer: "ab".repeat(32),
            service: "web".to_owned(),
            state: "disbanded",
            activated_ms: Some(1),
            ended_ms: None,
            end_reason: "load low, \"crowd\" gone".to_owned(),
            local_connections: 10,
            local_bytes: 1000,
            local_packets: 20,
            local_final: true,
            peer_connections: 10,
            peer_bytes: 1000,
            peer_packets: 20,
            peer_final: true,
            connections_discrepancy_percent: 0.0,
            bytes_discrepancy_percent: 0.0,
            charges_micros: 5,
            credit_micros: 0,
            total_micros: 5,
            currency: "EUR".to_owned(),
        };
        let text = export(std::slice::from_ref(&row), Format::Csv).unwrap();
        let mut lines = text.lines();
        assert!(
            lines
                .next()
                .unwrap()
                .starts_with("arrangement,role,peer,service")
        );
        assert!(
            lines
                .next()
                .unwrap()
                .contains("\"load low, \"\"crowd\"\" gone\"")
        );
        let empty = export(&[], Format::Csv).unwrap();
        assert!(empty.starts_with("arrangement,role"), "{empty}");
        let json: serde_json::Value =
            serde_json::from_str(&export(&[row], Format::Json).unwrap()).unwrap();
        assert_eq!(json[0]["local_bytes"], 1000);
    }
}
