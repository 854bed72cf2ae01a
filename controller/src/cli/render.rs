//! Human output of the operator commands: aligned tables and `key: value` blocks.

use std::fmt::Write as _;

use crate::{
    admin::{
        ArrangementDetail, ArrangementView, CapacityView, NegotiationView, PeerView, PolicyView,
        StatusView,
    },
    model::{Fingerprint, UnixMs},
};

/// Column-aligned rows under an upper-case header; no trailing spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let width = widths.get(i).copied().unwrap_or(0);
            let _ = write!(line, "{cell:<width$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `3s ago`, `in 5m`, `-` for none.
pub fn relative(at: Option<UnixMs>, now: UnixMs) -> String {
    let Some(at) = at.filter(|t| *t > 0) else {
        return "-".to_owned();
    };
    let delta = (now - at) / 1000;
    let span = |s: i64| match s {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    };
    if delta >= 0 {
        format!("{} ago", span(delta))
    } else {
        format!("in {}", span(-delta))
    }
}

fn opt(value: Option<&str>) -> String {
    value.filter(|v| !v.is_empty()).unwrap_or("-").to_owned()
}

fn capacity(c: &CapacityView) -> String {
    format!(
        "{} conn/s, {} Mbit/s, {} bytes storage",
        c.new_connections_per_s, c.egress_mbps, c.storage_bytes
    )
}

fn micros(value: u64, currency: &str) -> String {
    format!("{}.{:06} {currency}", value / 1_000_000, value % 1_000_000)
}

pub fn status(s: &StatusView, now: UnixMs) -> String {
    let peers: Vec<String> = s
        .peers
        .iter()
        .map(|(state, n)| format!("{} {n}", state.as_str()))
        .collect();
    let arrangements: Vec<String> = s
        .arrangements
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(state, n)| format!("{} {n}", state.as_str()))
        .collect();
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<14} {v}");
    };
    line("node:", s.name.clone());
    line("organisation:", opt(s.organisation.as_deref()));
    line("fingerprint:", s.fingerprint.to_string());
    line("version:", s.version.clone());
    line("started:", relative(Some(s.started_ms), now));
    line("control:", s.control_listen.clone());
    line("gossip:", s.gossip_listen.clone());
    line("admin:", s.admin_listen.clone());
    line("capacity:", capacity(&s.capacity));
    line("spare:", capacity(&s.spare));
    line("peers:", peers.join(", "));
    line(
        "arrangements:",
        if arrangements.is_empty() {
            "none".to_owned()
        } else {
            arrangements.join(", ")
        },
    );
    line("negotiating:", s.negotiations_running.to_string());
    out
}

pub fn peers(peers: &[PeerView], now: UnixMs) -> String {
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                p.fingerprint.short(),
                opt(p.name.as_deref()),
                opt(p.organisation.as_deref()),
                p.liveness.as_str().to_owned(),
                p.trust.map_or("-", |t| t.as_str()).to_owned(),
                opt(p.control_endpoint.as_deref()),
                p.spare
                    .as_ref()
                    .map_or("-".to_owned(), |c| c.new_connections_per_s.to_string()),
                p.regions.join(","),
                relative(p.last_seen_ms, now),
            ]
        })
        .collect();
    table(
        &[
            "PEER", "NAME", "ORG", "STATE", "TRUST", "CONTROL", "SPARE/S", "REGIONS", "SEEN",
        ],
        &rows,
    )
}

pub fn arrangements(list: &[ArrangementView], now: UnixMs) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            let terms = a.terms.as_ref();
            vec![
                a.id.clone(),
                a.role.as_str().to_owned(),
                a.peer_name.clone().unwrap_or_else(|| a.peer.short()),
                a.state.as_str().to_owned(),
                a.service.clone(),
                terms.map_or("-".to_owned(), |t| t.new_connections_per_s.to_string()),
                terms.map_or("-".to_owned(), |t| {
                    micros(t.price_per_gb_micros, &t.currency)
                }),
                relative(a.expires_ms, now),
            ]
        })
        .collect();
    table(
        &[
            "ID", "ROLE", "PEER", "STATE", "SERVICE", "CONN/S", "PRICE/GB", "EXPIRES",
        ],
        &rows,
    )
}

pub fn arrangement(d: &ArrangementDetail, now: UnixMs) -> String {
    let a = &d.arrangement;
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<12} {v}");
    };
    line("id:", a.id.clone());
    line("role:", a.role.as_str().to_owned());
    line("peer:", peer_label(&a.peer, a.peer_name.as_deref()));
    line("state:", a.state.as_str().to_owned());
    line("service:", a.service.clone());
    line("agreement:", opt(a.agreement_id.as_deref()));
    if let Some(t) = &a.terms {
        line(
            "capacity:",
            format!(
                "{} conn/s, {} Mbit/s",
                t.new_connections_per_s, t.egress_mbps
            ),
        );
        line(
            "price:",
            format!(
                "{} per GB, {} per 1000 connections",
                micros(t.price_per_gb_micros, &t.currency),
                micros(t.price_per_1000_connections_micros, &t.currency)
            ),
        );
        line(
            "sla:",
            format!(
                "availability {} ppm, p99 {} ms, mode {}",
                t.availability_ppm, t.p99_latency_ms, t.mode
            ),
        );
    }
    line("created:", relative(Some(a.created_ms), now));
    line("activated:", relative(a.activated_ms, now));
    line("expires:", relative(a.expires_ms, now));
    line("ended:", relative(a.ended_ms, now));
    line("end reason:", opt(a.end_reason.as_deref()));
    line(
        "usage:",
        format!(
            "local {} conn, {} bytes; peer {} conn, {} bytes",
            a.usage_local.connections,
            a.usage_local.bytes,
            a.usage_peer.connections,
            a.usage_peer.bytes
        ),
    );
    out.push('\n');
    let rows: Vec<Vec<String>> = d
        .events
        .iter()
        .map(|e| {
            vec![
                relative(Some(e.at_ms), now),
                e.from.map_or("-", |s| s.as_str()).to_owned(),
                e.to.as_str().to_owned(),
                e.detail.clone(),
            ]
        })
        .collect();
    out.push_str(&table(&["AT", "FROM", "TO", "DETAIL"], &rows));
    out
}

fn peer_label(fp: &Fingerprint, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{name} ({fp})"),
        None => fp.to_string(),
    }
}

pub fn policy(p: &PolicyView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "admit unknown:   {}", p.admit_unknown);
    let _ = writeln!(
        out,
        "min reputation:  {}",
        p.min_reputation_ppm
            .map_or("-".to_owned(), |v| format!("{v} ppm"))
    );
    let _ = writeln!(out, "offer share:     {}%", p.offer_share_percent);
    let _ = writeln!(
        out,
        "list price:      {} per GB, {} per 1000 connections",
        micros(p.price_per_gb_micros, &p.currency),
        micros(p.price_per_1000_connections_micros, &p.currency)
    );
    let _ = writeln!(
        out,
        "price ceiling:   {} per GB, {} per 1000 connections",
        micros(p.max_price_per_gb_micros, &p.currency),
        micros(p.max_price_per_1000_connections_micros, &p.currency)
    );
    out.push('\n');
    let rows: Vec<Vec<String>> = p
        .rules
        .iter()
        .map(|r| {
            vec![
                r.id.map_or("-".to_owned(), |id| id.to_string()),
                r.action.as_str().to_owned(),
                r.subject.to_string(),
                match r.source {
                    crate::admin::RuleSource::Config => "config",
                    crate::admin::RuleSource::Operator => "operator",
                }
                .to_owned(),
            ]
        })
        .collect();
    out.push_str(&table(&["RULE", "ACTION", "SUBJECT", "SOURCE"], &rows));
    if !p.long_term.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = p
            .long_term
            .iter()
            .map(|l| {
                vec![
                    l.agreement_id.clone(),
                    l.peer.short(),
                    l.role.as_str().to_owned(),
                    l.new_connections_per_s.to_string(),
                    l.duration_s.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["AGREEMENT", "PEER", "OUR ROLE", "CONN/S", "DURATION/S"],
            &rows,
        ));
    }
    out
}

pub fn negotiations(list: &[NegotiationView], now: UnixMs) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|n| {
            vec![
                n.request_id.clone(),
                n.service.clone(),
                n.state.as_str().to_owned(),
                format!(
                    "{}/{}",
                    n.covered_connections_per_s, n.requested_connections_per_s
                ),
                relative(Some(n.started_ms), now),
                n.arrangements.len().to_string(),
                n.detail.clone(),
            ]
        })
        .collect();
    table(
        &[
            "REQUEST",
            "SERVICE",
            "STATE",
            "COVERED/S",
            "STARTED",
            "ARRANGEMENTS",
            "DETAIL",
        ],
        &rows,
    )
}

pub fn negotiation(n: &NegotiationView) -> String {
    let mut out = format!(
        "negotiation {} for {}: {}, covered {} of {} conn/s with {} arrangement(s)",
        n.request_id,
        n.service,
        n.state.as_str(),
        n.covered_connections_per_s,
        n.requested_connections_per_s,
        n.arrangements.len()
    );
    if !n.detail.is_empty() {
        let _ = write!(out, " ({})", n.detail);
    }
    out.push('\n');
    for id in &n.arrangements {
        let _ = writeln!(out, "  arrangement {id}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_have_no_trailing_spaces() {
        let out = table(
            &["A", "LONGER"],
            &[
                vec!["value".into(), "x".into()],
                vec!["v".into(), String::new()],
            ],
        );
        assert_eq!(out, "A      LONGER\nvalue  x\nv\n");
    }

    #[test]
    fn relative_times_read_naturally() {
        assert_eq!(relative(Some(1_000), 4_000), "3s ago");
        assert_eq!(relative(Some(400_000), 100_000), "in 5m");
        assert_eq!(relative(None, 1), "-");
    }

    #[test]
    fn money_in_micro_units() {
        assert_eq!(micros(1_500_000, "EUR"), "1.500000 EUR");
        assert_eq!(micros(42, "EUR"), "0.000042 EUR");
    }
}
