//! The flash-crowd loop's control side: what the daemon does with the load monitor's events.
//!
//! - `Overloaded` / `MoreNeeded`: negotiate the deficit for the service (long-term peers first,
//!   then short-term candidates; activation programs the data plane). One negotiation per
//!   service at a time: events arriving meanwhile are coalesced into the largest deficit,
//!   negotiated when the running one ends (less what it covered).
//! - `Recovered`: retire every active arrangement of the service (drain, then disband with
//!   reason "crowd over").

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};

use super::{Core, Drain};
use crate::admin::{AdminBackend, NegotiateRequest};

/// What the monitor tells the daemon about one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadEvent {
    /// Sustained overload: `deficit_conn_per_s` more new connections/s are needed (headroom
    /// included).
    Overloaded {
        service: String,
        deficit_conn_per_s: u32,
        reason: String,
    },
    /// Still overloaded, and the deficit grew beyond what was asked for.
    MoreNeeded {
        service: String,
        deficit_conn_per_s: u32,
    },
    /// Load below the low-water mark for long enough: the crowd is over.
    Recovered { service: String },
}

impl LoadEvent {
    pub fn service(&self) -> &str {
        match self {
            Self::Overloaded { service, .. }
            | Self::MoreNeeded { service, .. }
            | Self::Recovered { service } => service,
        }
    }
}

/// Negotiations per overload event for what is still uncovered, and the pause between them.
const RETRIES: u32 = 3;
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Queue length of load events (the monitor never blocks on a slow negotiation).
pub(crate) const EVENT_QUEUE: usize = 64;

/// Runs until `stop`: takes events from `events` and acts on them.
pub(crate) async fn run(
    core: Arc<Core>,
    backend: Arc<dyn AdminBackend>,
    mut events: mpsc::Receiver<LoadEvent>,
    drain: Drain,
    mut stop: watch::Receiver<bool>,
) {
    // Per service: a negotiation or retirement running, and the deficit waiting behind it.
    let mut busy: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut waiting: HashMap<String, LoadEvent> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => {
                    let service = event.service().to_owned();
                    let merged = match (waiting.remove(&service), event) {
                        (Some(old), new) => merge(old, new),
                        (None, new) => new,
                    };
                    waiting.insert(service, merged);
                }
                None => return,
            },
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        busy.retain(|_, task| !task.is_finished());
        let ready: Vec<String> = waiting
            .keys()
            .filter(|s| !busy.contains_key(*s))
            .cloned()
            .collect();
        for service in ready {
            let Some(event) = waiting.remove(&service) else {
                continue;
            };
            let task = tokio::spawn(act(core.clone(), backend.clone(), event, drain));
            busy.insert(service, task);
        }
    }
}

/// A later event replaces an earlier one, except that deficits only grow while overloaded.
fn merge(old: LoadEvent, new: LoadEvent) -> LoadEvent {
    match (old, new) {
        (
            LoadEvent::Overloaded {
                service,
                deficit_conn_per_s: a,
                reason,
            },
            LoadEvent::MoreNeeded {
                deficit_conn_per_s: b,
                ..
            },
        ) => LoadEvent::Overloaded {
            service,
            deficit_conn_per_s: a.max(b),
            reason,
        },
        (
            LoadEvent::MoreNeeded {
                service,
                deficit_conn_per_s: a,
            },
            LoadEvent::MoreNeeded {
                deficit_conn_per_s: b,
                ..
            },
        ) => LoadEvent::MoreNeeded {
            service,
            deficit_conn_per_s: a.max(b),
        },
        (_, new) => new,
    }
}

async fn act(core: Arc<Core>, backend: Arc<dyn AdminBackend>, event: LoadEvent, drain: Drain) {
    // The deficit of a new overload is all the excess; what active arrangements already take
    // (standby long-term peers, steered by the kernel since the first overflowing SYN) is
    // not asked for again. A `MoreNeeded` deficit is already the growth alone.
    let (service, deficit, covered) = match event {
        LoadEvent::Overloaded {
            service,
            deficit_conn_per_s,
            ..
        } => {
            let covered: u64 = core
                .active_primary(&service)
                .map(|active| active.iter().map(super::granted_conn).sum())
                .unwrap_or(0);
            (service, deficit_conn_per_s, covered)
        }
        LoadEvent::MoreNeeded {
            service,
            deficit_conn_per_s,
        } => (service, deficit_conn_per_s, 0),
        LoadEvent::Recovered { service } => {
            retire(&core, &service, drain).await;
            return;
        }
    };
    // What no one covered is asked for again, a few times, a second apart (peers may
    // not be known yet, or busy).
    let mut wanted = u64::from(deficit).saturating_sub(covered);
    if covered > 0 {
        tracing::info!(
            service,
            deficit,
            covered,
            "overload: active arrangements already cover part of the deficit"
        );
    }
    for attempt in 0..RETRIES {
        if wanted == 0 {
            return;
        }
        if attempt > 0 {
            tokio::time::sleep(RETRY_AFTER).await;
        }
        let started = Instant::now();
        let outcome = backend
            .negotiate(NegotiateRequest {
                service: service.clone(),
                new_connections_per_s: Some(wanted),
                duration_s: None,
            })
            .await;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        metrics::histogram!("p2pcdn_autopilot_negotiation_ms").record(ms);
        match outcome {
            Ok(view) => {
                tracing::info!(service, wanted, covered = view.covered_connections_per_s,
                    state = ?view.state, ms, "capacity negotiated for an overload");
                wanted = wanted.saturating_sub(view.covered_connections_per_s);
            }
            Err(e) => tracing::warn!(service, wanted, error = %e,
                "cannot negotiate capacity for an overload"),
        }
    }
    if wanted > 0 {
        tracing::warn!(
            service,
            uncovered = wanted,
            "overload not fully covered after {RETRIES} negotiations"
        );
    }
}

/// The crowd is over: every active arrangement of `service` is drained and disbanded with its
/// accounting (standby ones too: the keeper arms a fresh one for the next crowd).
async fn retire(core: &Arc<Core>, service: &str, drain: Drain) {
    match super::retire_service(core, service, "load below the low-water mark", drain).await {
        Ok(ended) => tracing::info!(
            service,
            arrangements = ended.len(),
            "crowd over: arrangements retired"
        ),
        Err(e) => tracing::warn!(service, error = %e, "cannot retire arrangements"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deficits_only_grow_while_overloaded_and_recovery_replaces() {
        let over = |d| LoadEvent::Overloaded {
            service: "web".to_owned(),
            deficit_conn_per_s: d,
            reason: "r".to_owned(),
        };
        let more = |d| LoadEvent::MoreNeeded {
            service: "web".to_owned(),
            deficit_conn_per_s: d,
        };
        assert_eq!(merge(over(300), more(200)), over(300));
        assert_eq!(merge(over(300), more(500)), over(500));
        assert_eq!(merge(more(300), more(100)), more(300));
        let rec = LoadEvent::Recovered {
            service: "web".to_owned(),
        };
        assert_eq!(merge(over(300), rec.clone()), rec);
        assert_eq!(merge(rec, over(10)), over(10));
    }
}
