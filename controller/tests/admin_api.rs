//! The admin router with a fake backend: authentication (401/403), JSON answers, clear 400s,
//! body limits and the Prometheus text.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

mod admin_fake;

use std::sync::Arc;

use admin_fake::{Fake, OPERATOR, VIEWER, fp};
use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode, header},
};
use http_body_util::BodyExt;
use p2pcdn_controller::{
    admin::{
        self, ArrangementDetail, ArrangementView, ClientCert, ErrorBody, LivenessView,
        NegotiationView, PeerView, PolicyRuleView, RuleSubject, StateView, StatusView,
    },
    model::Fingerprint,
};
use tower::Service;

struct Api {
    app: Router,
    backend: Arc<Fake>,
}

fn api() -> Api {
    let backend = admin_fake::backend();
    let app = admin::router(
        backend.clone(),
        admin_fake::auth(),
        admin::install_metrics(),
    );
    Api { app, backend }
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not the expected JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn error(&self) -> String {
        self.json::<ErrorBody>().error
    }
}

impl Api {
    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.app.clone().call(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        let mut request = Request::get(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        self.send(request.body(Body::empty()).unwrap()).await
    }

    async fn send_json(&self, method: Method, path: &str, token: &str, body: &str) -> Answer {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        self.send(request).await
    }
}

#[tokio::test]
async fn no_or_unknown_credentials_get_401_with_a_bearer_challenge() {
    let api = api();
    for (path, token) in [
        ("/v1/status", None),
        ("/v1/status", Some("wrong-token")),
        ("/metrics", None),
        ("/v1/no-such-route", None),
    ] {
        let answer = api.get(path, token).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{path} {token:?}");
        let challenge = answer.headers.get(header::WWW_AUTHENTICATE).unwrap();
        assert!(challenge.to_str().unwrap().starts_with("Bearer"));
        assert!(!answer.error().is_empty());
    }
    let malformed = Request::get("/v1/status")
        .header(header::AUTHORIZATION, format!("Basic {VIEWER}"))
        .body(Body::empty())
        .unwrap();
    let answer = api.send(malformed).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(answer.error().contains("Bearer"), "{}", answer.error());
}

#[tokio::test]
async fn viewer_reads_but_gets_403_on_operator_routes() {
    let api = api();
    let status = api.get("/v1/status", Some(VIEWER)).await;
    assert_eq!(status.status, StatusCode::OK);
    let status: StatusView = status.json();
    assert_eq!(status.name, "edge-a");
    assert_eq!(status.peers[&LivenessView::Alive], 3);

    let peers: Vec<PeerView> = api.get("/v1/peers", Some(VIEWER)).await.json();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].fingerprint, fp(2));

    for (method, path, body) in [
        (
            Method::POST,
            "/v1/policy/rules",
            r#"{"action":"deny","organisation":"Evil"}"#,
        ),
        (Method::DELETE, "/v1/policy/rules/7", ""),
        (Method::POST, "/v1/negotiate", r#"{"service":"video"}"#),
        (Method::POST, "/v1/arrangements/a1/disband", "{}"),
    ] {
        let answer = api.send_json(method.clone(), path, VIEWER, body).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{method} {path}");
        assert!(answer.error().contains("operator"));
    }
    assert!(
        api.backend.calls().is_empty(),
        "a viewer reached the backend: {:?}",
        api.backend.calls()
    );
}

#[tokio::test]
async fn operator_changes_policy_negotiates_and_disbands() {
    let api = api();
    let added = api
        .send_json(
            Method::POST,
            "/v1/policy/rules",
            OPERATOR,
            &format!(r#"{{"action":"allow","fingerprint":"{}"}}"#, fp(3)),
        )
        .await;
    assert_eq!(added.status, StatusCode::CREATED);
    let rule: PolicyRuleView = added.json();
    assert_eq!(rule.id, Some(7));
    assert_eq!(rule.subject, RuleSubject::Fingerprint(fp(3)));

    let removed = api
        .send_json(Method::DELETE, "/v1/policy/rules/7", OPERATOR, "")
        .await;
    assert_eq!(removed.status, StatusCode::OK);
    let missing = api
        .send_json(Method::DELETE, "/v1/policy/rules/8", OPERATOR, "")
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error(), "no policy rule 8");

    let negotiated = api
        .send_json(
            Method::POST,
            "/v1/negotiate",
            OPERATOR,
            r#"{"service":"video","new_connections_per_s":250}"#,
        )
        .await;
    assert_eq!(negotiated.status, StatusCode::OK);
    let outcome: NegotiationView = negotiated.json();
    assert_eq!(outcome.requested_connections_per_s, 250);

    let disbanded = api
        .send_json(
            Method::POST,
            "/v1/arrangements/a1/disband",
            OPERATOR,
            r#"{"reason":"crowd over"}"#,
        )
        .await;
    assert_eq!(disbanded.status, StatusCode::OK);
    let a: ArrangementView = disbanded.json();
    assert_eq!(a.state, StateView::Disbanded);
    assert_eq!(a.end_reason.as_deref(), Some("crowd over"));

    let default_reason = api
        .send_json(Method::POST, "/v1/arrangements/a3/disband", OPERATOR, "{}")
        .await;
    assert_eq!(
        default_reason
            .json::<ArrangementView>()
            .end_reason
            .as_deref(),
        Some(admin::DEFAULT_DISBAND_REASON)
    );

    let conflict = api
        .send_json(Method::POST, "/v1/arrangements/a2/disband", OPERATOR, "{}")
        .await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn bad_bodies_and_parameters_get_clear_400s() {
    let api = api();
    let cases: &[(Method, &str, &str, &str)] = &[
        (
            Method::POST,
            "/v1/policy/rules",
            "{not json",
            "invalid JSON body",
        ),
        (Method::POST, "/v1/policy/rules", "", "JSON object"),
        (
            Method::POST,
            "/v1/policy/rules",
            r#"{"action":"allow","fingerprint":"abc"}"#,
            "fingerprint",
        ),
        (
            Method::POST,
            "/v1/policy/rules",
            r#"{"action":"maybe","organisation":"X"}"#,
            "unknown variant",
        ),
        (
            Method::POST,
            "/v1/policy/rules",
            r#"{"action":"allow","organisation":"X","colour":"red"}"#,
            "unknown field",
        ),
        (
            Method::POST,
            "/v1/policy/rules",
            r#"{"action":"allow"}"#,
            "give a fingerprint or an organisation",
        ),
        (
            Method::POST,
            "/v1/policy/rules",
            &format!(
                r#"{{"action":"allow","organisation":"X","fingerprint":"{}"}}"#,
                fp(1)
            ),
            "not both",
        ),
        (
            Method::POST,
            "/v1/negotiate",
            r#"{"service":""}"#,
            "service",
        ),
        (
            Method::POST,
            "/v1/negotiate",
            r#"{"service":"video","new_connections_per_s":0}"#,
            "at least 1",
        ),
        (
            Method::POST,
            "/v1/negotiate",
            r#"{"service":"video","new_connections_per_s":-5}"#,
            "invalid JSON body",
        ),
        (Method::DELETE, "/v1/policy/rules/seven", "", "integer"),
        (
            Method::POST,
            "/v1/arrangements/a%20b/disband",
            "{}",
            "invalid arrangement id",
        ),
    ];
    for (method, path, body, expected) in cases {
        let answer = api.send_json(method.clone(), path, OPERATOR, body).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{method} {path} {body}"
        );
        let error = answer.error();
        assert!(error.contains(expected), "{path} {body}: {error:?}");
        assert!(!error.contains('\n'), "multi-line error: {error:?}");
    }
    for (path, expected) in [
        (
            "/v1/arrangements?state=dancing",
            "unknown arrangement state",
        ),
        ("/v1/arrangements?role=boss", "primary or provider"),
        ("/v1/arrangements?peer=xyz", "fingerprint"),
        ("/v1/arrangements?colour=red", "unknown field"),
    ] {
        let answer = api.get(path, Some(VIEWER)).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(
            answer.error().contains(expected),
            "{path}: {}",
            answer.error()
        );
    }
    // Only the rule-less body checks above reach the backend's validation, none of the rest.
    assert!(
        api.backend
            .calls()
            .iter()
            .all(|c| !c.starts_with("add_rule")),
        "{:?}",
        api.backend.calls()
    );
}

#[tokio::test]
async fn wrong_content_type_and_oversized_bodies_are_refused() {
    let api = api();
    let text = Request::post("/v1/negotiate")
        .header(header::AUTHORIZATION, format!("Bearer {OPERATOR}"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(r#"{"service":"video"}"#))
        .unwrap();
    assert_eq!(
        api.send(text).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );

    let huge = format!(
        r#"{{"service":"video","pad":"{}"}}"#,
        "x".repeat(admin::MAX_BODY_BYTES)
    );
    let answer = api
        .send_json(Method::POST, "/v1/negotiate", OPERATOR, &huge)
        .await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(answer.error().contains("larger than"));
    assert!(api.backend.calls().is_empty());
}

#[tokio::test]
async fn filters_reach_the_backend_and_unknown_ids_are_404() {
    let api = api();
    let active: Vec<ArrangementView> = api
        .get("/v1/arrangements?state=active&role=primary", Some(VIEWER))
        .await
        .json();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].id, "a1");
    assert_eq!(
        api.backend.calls(),
        vec!["arrangements Some(Active) Some(Primary)".to_owned()]
    );

    let detail: ArrangementDetail = api.get("/v1/arrangements/a1", Some(VIEWER)).await.json();
    assert_eq!(detail.arrangement.state, StateView::Active);
    let missing = api.get("/v1/arrangements/zz", Some(VIEWER)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error(), "no arrangement zz");

    let nowhere = api.get("/v1/nowhere", Some(VIEWER)).await;
    assert_eq!(nowhere.status, StatusCode::NOT_FOUND);
    assert_eq!(nowhere.error(), "no such route");
    let wrong_method = api
        .send_json(Method::PUT, "/v1/status", OPERATOR, "{}")
        .await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn client_certificate_fingerprints_grant_their_roles() {
    let api = api();
    let with_cert = |fingerprint: Fingerprint, method: Method, path: &str| {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"service":"video"}"#))
            .unwrap();
        request
            .extensions_mut()
            .insert(ClientCert(Some(fingerprint)));
        request
    };
    let operator = api
        .send(with_cert(fp(9), Method::POST, "/v1/negotiate"))
        .await;
    assert_eq!(operator.status, StatusCode::OK);
    let viewer = api
        .send(with_cert(fp(8), Method::POST, "/v1/negotiate"))
        .await;
    assert_eq!(viewer.status, StatusCode::FORBIDDEN);
    let viewer_reads = api.send(with_cert(fp(8), Method::GET, "/v1/status")).await;
    assert_eq!(viewer_reads.status, StatusCode::OK);
    let stranger = api.send(with_cert(fp(7), Method::GET, "/v1/status")).await;
    assert_eq!(stranger.status, StatusCode::UNAUTHORIZED);
    assert!(stranger.error().contains("admin.clients"));
}

#[tokio::test]
async fn metrics_render_state_gauges_from_the_backend() {
    let api = api();
    metrics::counter!(admin::NEGOTIATIONS_COUNTER, "outcome" => "succeeded").increment(1);
    let answer = api.get("/metrics", Some(VIEWER)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(answer.body).unwrap();
    for line in [
        "p2pcdn_peers{state=\"alive\"} 3",
        "p2pcdn_peers{state=\"suspect\"} 0",
        "p2pcdn_peers{state=\"dead\"} 1",
        "p2pcdn_arrangements{state=\"active\"} 2",
        "p2pcdn_arrangements{state=\"cancelled\"} 0",
        "p2pcdn_negotiations_total{outcome=\"succeeded\"}",
        "# TYPE p2pcdn_peers gauge",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}
