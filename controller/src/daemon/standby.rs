//! Standby long-term peers (`standby = true` in a primary's `[[policy.long_term]]`): each such
//! agreement is kept active for every configured service, so the peer is in the data plane
//! before a crowd begins. The XDP program then steers overflow to it as soon as the local
//! admission bucket runs dry — in the kernel, with no control-plane round trip — while the
//! monitor and the negotiation only have to find what the standby peers do not cover.
//!
//! The keeper looks every [`CHECK`]: a service without an active arrangement under the
//! agreement (never armed, disbanded after a crowd, ended for a breach, or expiring within
//! [`RENEW_BEFORE`]) gets one by the seed's 2-step activation. Failures back off from one
//! second up to [`MAX_BACKOFF`] per agreement and service, so an unreachable peer is not
//! hammered.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{Core, DisbandCause};
use crate::{
    mediator,
    model::{Role, UnixMs, now_ms},
    policy::LongTerm,
    proto::pb::{self, ArrangementState as State},
    store::{ArrangementFilter, ArrangementRecord},
};

/// How often the keeper looks.
pub(crate) const CHECK: Duration = Duration::from_secs(1);
/// An arrangement expiring sooner than this is replaced ahead of time.
pub(crate) const RENEW_BEFORE: Duration = Duration::from_secs(30);
/// Longest pause between two attempts for one agreement and service.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Whether `a` is the standing arrangement of `agreement` for `service`, good for a while yet.
pub(crate) fn covers(
    a: &ArrangementRecord,
    agreement: &LongTerm,
    service: &str,
    now_ms: UnixMs,
) -> bool {
    a.role == Role::Primary
        && a.peer == agreement.peer
        && a.agreement_id.as_deref() == Some(agreement.agreement_id.as_str())
        && a.service.as_ref().is_some_and(|s| s.name == service)
        && matches!(a.state, State::Accepted | State::Active)
        && a.expires_ms
            .is_none_or(|e| e > now_ms.saturating_add(super::millis(RENEW_BEFORE)))
}

/// Retry state of one (agreement, service).
struct Attempts {
    next: Instant,
    backoff: Duration,
}

/// Runs until `stop`: keeps every standby agreement active for every service.
pub(crate) async fn keep(core: Arc<Core>, mut stop: watch::Receiver<bool>) {
    let standby: Vec<LongTerm> = core
        .policy
        .long_term()
        .iter()
        .filter(|l| l.standby && l.role == Role::Primary)
        .cloned()
        .collect();
    if standby.is_empty() || core.config.services.is_empty() {
        return;
    }
    let mut attempts: HashMap<(String, String), Attempts> = HashMap::new();
    let mut tick = tokio::time::interval(CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if core.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let active = match core.store.arrangements(&ArrangementFilter {
            role: Some(Role::Primary),
            states: vec![State::Accepted, State::Active],
            limit: Some(usize::MAX),
            ..ArrangementFilter::default()
        }) {
            Ok(active) => active,
            Err(e) => {
                tracing::warn!(error = %e, "standby: cannot read the arrangements");
                continue;
            }
        };
        let now = now_ms();
        for agreement in &standby {
            for service in &core.config.services {
                if active
                    .iter()
                    .any(|a| covers(a, agreement, &service.name, now))
                {
                    attempts.remove(&(agreement.agreement_id.clone(), service.name.clone()));
                    continue;
                }
                let key = (agreement.agreement_id.clone(), service.name.clone());
                if attempts.get(&key).is_some_and(|a| Instant::now() < a.next) {
                    continue;
                }
                match arm(&core, agreement, service).await {
                    Ok(record) => {
                        attempts.remove(&key);
                        tracing::info!(arrangement = %record.id, agreement = %agreement.agreement_id,
                            service = %service.name, peer = %agreement.peer.short(),
                            "standby: long-term peer armed in the data plane");
                    }
                    Err(e) => {
                        let backoff = attempts
                            .get(&key)
                            .map_or(CHECK, |a| (a.backoff * 2).min(MAX_BACKOFF));
                        tracing::warn!(agreement = %agreement.agreement_id, service = %service.name,
                            retry_in_ms = backoff.as_millis() as u64, error = %e,
                            "standby: cannot arm the long-term peer");
                        attempts.insert(
                            key,
                            Attempts {
                                next: Instant::now() + backoff,
                                backoff,
                            },
                        );
                    }
                }
            }
        }
    }
}

/// Activates `agreement` for `service` and puts the peer in the data plane.
async fn arm(
    core: &Arc<Core>,
    agreement: &LongTerm,
    service: &crate::config::ServiceConfig,
) -> Result<ArrangementRecord, String> {
    let peer = core
        .registry
        .candidates(now_ms())
        .into_iter()
        .find(|c| c.fingerprint == agreement.peer)
        .ok_or_else(|| format!("peer {} is not reachable", agreement.peer.short()))?;
    if !super::trust_loop::usable(core, &peer.fingerprint) {
        return Err(format!(
            "peer {} is quarantined or isolated by trust",
            agreement.peer.short()
        ));
    }
    let req = mediator::requirements(
        service,
        &core.config.resources,
        &core.policy,
        agreement.new_connections_per_s,
        now_ms(),
    );
    let record = core
        .negotiator
        .activate_long_term(agreement, &peer, req)
        .await
        .map_err(|e| e.to_string())?;
    if let Err(e) = core.hooks.activated(&record) {
        let cause = DisbandCause::new(
            pb::DisbandReason::Operator,
            format!("the data plane refused it: {e}"),
        );
        core.disband_logged(&record.id, cause).await;
        return Err(format!("the data plane refused it: {e}"));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Fingerprint;

    fn agreement() -> LongTerm {
        LongTerm {
            agreement_id: "lt-1".to_owned(),
            peer: Fingerprint([7; 32]),
            role: Role::Primary,
            new_connections_per_s: 100,
            egress_mbps: 0,
            price_per_gb_micros: 0,
            price_per_1000_connections_micros: 0,
            currency: "EUR".to_owned(),
            sla_availability_ppm: 999_000,
            sla_p99_latency_ms: 100,
            penalty_credit_percent: 0,
            penalty_max_percent: 0,
            duration_s: 3600,
            standby: true,
        }
    }

    #[test]
    fn only_a_live_arrangement_of_the_agreement_for_the_service_covers_it() {
        let lt = agreement();
        let mut a = ArrangementRecord::new(
            "a-1".to_owned(),
            Role::Primary,
            lt.peer,
            State::Active,
            "r-1".to_owned(),
            1,
        );
        a.agreement_id = Some("lt-1".to_owned());
        a.service = Some(pb::ServiceSpec {
            name: "web".to_owned(),
            ..pb::ServiceSpec::default()
        });
        a.expires_ms = Some(1_000_000);
        assert!(covers(&a, &lt, "web", 1_000));
        assert!(!covers(&a, &lt, "video", 1_000), "another service");
        assert!(
            !covers(&a, &lt, "web", 1_000_000 - 10_000),
            "expiring within RENEW_BEFORE: renewed ahead of time"
        );
        let mut ended = a.clone();
        ended.state = State::Disbanded;
        assert!(!covers(&ended, &lt, "web", 1_000));
        let mut other = a.clone();
        other.agreement_id = None;
        assert!(
            !covers(&other, &lt, "web", 1_000),
            "a short-term arrangement"
        );
        let mut provider = a;
        provider.role = Role::Provider;
        assert!(!covers(&provider, &lt, "web", 1_000));
    }
}
