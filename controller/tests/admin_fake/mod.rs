//! A fake [`AdminBackend`] with fixed answers, shared by the admin and cli tests.
#![allow(dead_code, reason = "each test file uses a part")]

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use p2pcdn_controller::{
    admin::{
        AdminAuth, AdminBackend, AdminRole, ArrangementDetail, ArrangementFilter, ArrangementView,
        BackendError, BoxFuture, CapacityView, LivenessView, NegotiateRequest, NegotiationState,
        NegotiationView, NewPolicyRule, PeerView, PolicyRuleView, PolicyView, RuleSource,
        StateView, StatusView,
    },
    model::{Fingerprint, Role, TrustLevel},
};

pub const VIEWER: &str = "viewer-token-0123456789";
pub const OPERATOR: &str = "operator-token-0123456789";

#[derive(Default)]
pub struct Fake {
    calls: Mutex<Vec<String>>,
}

impl Fake {
    pub fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

pub fn fp(byte: u8) -> Fingerprint {
    Fingerprint([byte; 32])
}

pub fn arrangement(id: &str, state: StateView) -> ArrangementView {
    ArrangementView {
        id: id.to_owned(),
        role: Role::Primary,
        peer: fp(2),
        peer_name: Some("edge-b".into()),
        state,
        service: "video".into(),
        agreement_id: None,
        terms: None,
        created_ms: 1,
        updated_ms: 2,
        activated_ms: None,
        expires_ms: None,
        ended_ms: None,
        end_reason: None,
        usage_local: Default::default(),
        usage_peer: Default::default(),
    }
}

impl AdminBackend for Fake {
    fn status(&self) -> BoxFuture<'_, Result<StatusView, BackendError>> {
        Box::pin(async {
            let peers: BTreeMap<_, _> = [(LivenessView::Alive, 3), (LivenessView::Dead, 1)].into();
            let arrangements: BTreeMap<_, _> = [(StateView::Active, 2)].into();
            Ok(StatusView {
                name: "edge-a".into(),
                organisation: Some("Example".into()),
                fingerprint: fp(1),
                version: "0.1.0".into(),
                started_ms: 1,
                control_listen: "127.0.0.1:7443".into(),
                gossip_listen: "127.0.0.1:7946".into(),
                admin_listen: "127.0.0.1:7444".into(),
                capacity: CapacityView::default(),
                spare: CapacityView::default(),
                peers,
                arrangements,
                negotiations_running: 0,
            })
        })
    }

    fn peers(&self) -> BoxFuture<'_, Result<Vec<PeerView>, BackendError>> {
        Box::pin(async {
            Ok(vec![PeerView {
                fingerprint: fp(2),
                name: Some("edge-b".into()),
                organisation: None,
                trust: Some(TrustLevel::Allowed),
                liveness: LivenessView::Alive,
                control_endpoint: Some("127.0.0.1:9000".into()),
                regions: vec!["DE".into()],
                modes: vec!["dsr-gue".into()],
                spare: None,
                advert_sequence: Some(4),
                advert_expires_ms: None,
                last_seen_ms: None,
                reputation_ppm: None,
                assessment: None,
            }])
        })
    }

    fn arrangements(
        &self,
        filter: ArrangementFilter,
    ) -> BoxFuture<'_, Result<Vec<ArrangementView>, BackendError>> {
        self.record(format!("arrangements {:?} {:?}", filter.state, filter.role));
        Box::pin(async move {
            let all = [
                arrangement("a1", StateView::Active),
                arrangement("a2", StateView::Cancelled),
            ];
            Ok(all
                .into_iter()
                .filter(|a| filter.state.is_none_or(|s| s == a.state))
                .collect())
        })
    }

    fn arrangement(&self, id: String) -> BoxFuture<'_, Result<ArrangementDetail, BackendError>> {
        Box::pin(async move {
            if id == "a1" {
                Ok(ArrangementDetail {
                    arrangement: arrangement("a1", StateView::Active),
                    events: vec![],
                })
            } else {
                Err(BackendError::NotFound(format!("no arrangement {id}")))
            }
        })
    }

    fn policy(&self) -> BoxFuture<'_, Result<PolicyView, BackendError>> {
        Box::pin(async {
            Ok(PolicyView {
                admit_unknown: "allow-list".into(),
                rules: vec![],
                min_reputation_ppm: None,
                offer_share_percent: 50,
                price_per_gb_micros: 1,
                price_per_1000_connections_micros: 1,
                currency: "EUR".into(),
                max_price_per_gb_micros: 2,
                max_price_per_1000_connections_micros: 2,
                long_term: vec![],
            })
        })
    }

    fn negotiations(&self) -> BoxFuture<'_, Result<Vec<NegotiationView>, BackendError>> {
        Box::pin(async { Ok(vec![]) })
    }

    fn add_policy_rule(
        &self,
        rule: NewPolicyRule,
    ) -> BoxFuture<'_, Result<PolicyRuleView, BackendError>> {
        self.record(format!("add_rule {rule:?}"));
        Box::pin(async move {
            Ok(PolicyRuleView {
                id: Some(7),
                action: rule.action,
                subject: rule.subject().map_err(BackendError::Invalid)?,
                source: RuleSource::Operator,
                created_ms: Some(5),
            })
        })
    }

    fn remove_policy_rule(&self, id: i64) -> BoxFuture<'_, Result<(), BackendError>> {
        self.record(format!("remove_rule {id}"));
        Box::pin(async move {
            if id == 7 {
                Ok(())
            } else {
                Err(BackendError::NotFound(format!("no policy rule {id}")))
            }
        })
    }

    fn negotiate(
        &self,
        request: NegotiateRequest,
    ) -> BoxFuture<'_, Result<NegotiationView, BackendError>> {
        self.record(format!("negotiate {request:?}"));
        Box::pin(async move {
            Ok(NegotiationView {
                request_id: "n1".into(),
                service: request.service,
                state: NegotiationState::Succeeded,
                started_ms: 1,
                ended_ms: Some(2),
                requested_connections_per_s: request.new_connections_per_s.unwrap_or(100),
                covered_connections_per_s: 100,
                arrangements: vec!["a1".into()],
                detail: String::new(),
            })
        })
    }

    fn disband(
        &self,
        id: String,
        reason: String,
    ) -> BoxFuture<'_, Result<ArrangementView, BackendError>> {
        self.record(format!("disband {id} {reason}"));
        Box::pin(async move {
            if id == "a2" {
                return Err(BackendError::Conflict("arrangement a2 is cancelled".into()));
            }
            let mut a = arrangement(&id, StateView::Disbanded);
            a.end_reason = Some(reason);
            Ok(a)
        })
    }
}

/// Viewer and operator tokens; fingerprints 9 (operator) and 8 (viewer) as clients.
pub fn auth() -> AdminAuth {
    auth_with_clients([(fp(9), AdminRole::Operator), (fp(8), AdminRole::Viewer)])
}

pub fn auth_with_clients(clients: impl IntoIterator<Item = (Fingerprint, AdminRole)>) -> AdminAuth {
    AdminAuth::new(
        [
            (VIEWER.to_owned(), AdminRole::Viewer),
            (OPERATOR.to_owned(), AdminRole::Operator),
        ],
        clients,
    )
    .unwrap()
}

pub fn backend() -> Arc<Fake> {
    Arc::new(Fake::default())
}
