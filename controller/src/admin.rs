//! The operator API: JSON over HTTPS (the node certificate) on its own listener, and
//! Prometheus `/metrics`.
//!
//! Every request is authenticated: `Authorization: Bearer <token>` with a token from the
//! config's `[[admin.tokens]]`, or a client certificate whose fingerprint `[[admin.clients]]`
//! lists. No or unknown credentials get 401 (with `WWW-Authenticate: Bearer`); a viewer on an
//! operator route gets 403. Errors are `{"error": "..."}`. The routes, their roles and status
//! codes are documented in `docs/admin-api.md`.
//!
//! The daemon answers through [`AdminBackend`]; [`router`] builds the axum app, [`serve`] runs
//! it over TLS until shutdown.

mod auth;
mod client;
mod server;
mod views;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State,
        rejection::{PathRejection, QueryRejection},
    },
    http::{HeaderValue, StatusCode, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use self::{
    auth::{AdminAuth, AdminRole, ClientCert, MAX_TOKEN_LEN},
    client::{AdminClient, ClientError, MAX_RESPONSE_BYTES},
    server::{serve, tls_config},
    views::*,
};
use crate::model::{Fingerprint, Role};

/// Largest request body (JSON) the API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest arrangement id accepted in a path.
pub const MAX_ID_LEN: usize = 128;

/// Errors setting up or running the admin API.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin tokens must be 1 to {0} bytes long")]
    BadToken(usize),
    #[error("cannot draw random bytes for the token key")]
    Random,
    #[error("admin tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("admin api: accept failed: {0}")]
    Accept(#[source] std::io::Error),
}

/// What an authenticated request carries: the caller's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub role: AdminRole,
}

/// An error response: a status and a one-line reason, rendered as `{"error": reason}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        let status = match &e {
            BackendError::NotFound(_) => StatusCode::NOT_FOUND,
            BackendError::Invalid(_) => StatusCode::BAD_REQUEST,
            BackendError::Conflict(_) => StatusCode::CONFLICT,
            BackendError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            BackendError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!(error = %e, "admin api: backend failed");
        }
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"p2pcdn\""),
            );
        }
        response
    }
}

type ApiResult<T> = Result<axum::Json<T>, ApiError>;

/// Extractor that admits only operators (403 for viewers). Put it first in a handler's
/// arguments so the role is checked before the body is read.
pub struct Operator;

impl<S: Send + Sync> FromRequestParts<S> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        match parts.extensions.get::<Caller>() {
            Some(Caller {
                role: AdminRole::Operator,
            }) => Ok(Self),
            Some(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this route needs the operator role",
            )),
            None => Err(unauthorised("authentication required")),
        }
    }
}

/// A JSON body with clear errors: 415 for another content type, 413 above
/// [`MAX_BODY_BYTES`], 400 with serde's reason for anything that does not parse.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if let Some(content_type) = req.headers().get(header::CONTENT_TYPE) {
            let essence = content_type
                .to_str()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if essence != "application/json" {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "request body must be application/json",
                ));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is larger than {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::new(rejection.status(), one_line(&rejection.body_text()))
            }
        })?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request("request body must be a JSON object"));
        }
        serde_json::from_slice(&bytes)
            .map(Self)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn unauthorised(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, message)
}

/// The whole API with its authentication, body limit and JSON 404/405.
pub fn router(
    backend: Arc<dyn AdminBackend>,
    auth: AdminAuth,
    metrics: PrometheusHandle,
) -> Router {
    let state = AppState { backend, metrics };
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/arrangements", get(arrangements))
        .route("/v1/arrangements/{id}", get(arrangement))
        .route("/v1/arrangements/{id}/disband", post(disband))
        .route("/v1/policy", get(policy))
        .route("/v1/policy/rules", post(add_rule))
        .route("/v1/policy/rules/{id}", delete(remove_rule))
        .route("/v1/negotiations", get(negotiations))
        .route("/v1/negotiate", post(negotiate))
        .route("/metrics", get(render_metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .with_state(state)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(auth, authenticate))
}

#[derive(Clone)]
struct AppState {
    backend: Arc<dyn AdminBackend>,
    metrics: PrometheusHandle,
}

/// Resolves the caller's role from the bearer token, else from the client certificate.
/// A request that carries an `Authorization` header is judged by it alone.
async fn authenticate(State(auth): State<AdminAuth>, mut req: Request, next: Next) -> Response {
    let role = if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let Some(token) = value.to_str().ok().and_then(bearer_token) else {
            return unauthorised("malformed authorization header (expected: Bearer <token>)")
                .into_response();
        };
        match auth.token_role(token) {
            Some(role) => role,
            None => return unauthorised("unknown token").into_response(),
        }
    } else {
        let cert = req.extensions().get::<ClientCert>().and_then(|c| c.0);
        match cert.and_then(|fp| auth.client_role(&fp).map(|role| (fp, role))) {
            Some((_, role)) => role,
            None if cert.is_some() => {
                return unauthorised("client certificate not listed in admin.clients")
                    .into_response();
            }
            None => {
                return unauthorised(
                    "authentication required: a bearer token or a client certificate",
                )
                .into_response();
            }
        }
    };
    req.extensions_mut().insert(Caller { role });
    next.run(req).await
}

fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn status(State(s): State<AppState>) -> ApiResult<StatusView> {
    Ok(axum::Json(s.backend.status().await?))
}

async fn peers(State(s): State<AppState>) -> ApiResult<Vec<PeerView>> {
    Ok(axum::Json(s.backend.peers().await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArrangementQuery {
    state: Option<String>,
    role: Option<String>,
    peer: Option<String>,
}

async fn arrangements(
    State(s): State<AppState>,
    query: Result<Query<ArrangementQuery>, QueryRejection>,
) -> ApiResult<Vec<ArrangementView>> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(one_line(&e.body_text())))?;
    let filter = ArrangementFilter {
        state: query
            .state
            .as_deref()
            .map(str::parse::<StateView>)
            .transpose()
            .map_err(ApiError::bad_request)?,
        role: query
            .role
            .as_deref()
            .map(str::parse::<Role>)
            .transpose()
            .map_err(|e| ApiError::bad_request(format!("{e} (primary or provider)")))?,
        peer: query
            .peer
            .as_deref()
            .map(str::parse::<Fingerprint>)
            .transpose()
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
    };
    Ok(axum::Json(s.backend.arrangements(filter).await?))
}

fn arrangement_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::bad_request(one_line(&e.body_text())))?;
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if valid {
        Ok(id)
    } else {
        Err(ApiError::bad_request(format!(
            "invalid arrangement id (1 to {MAX_ID_LEN} of A-Z a-z 0-9 - _ . :)"
        )))
    }
}

async fn arrangement(
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<ArrangementDetail> {
    let id = arrangement_id(path)?;
    Ok(axum::Json(s.backend.arrangement(id).await?))
}

async fn disband(
    _: Operator,
    State(s): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<DisbandRequest>,
) -> ApiResult<ArrangementView> {
    let id = arrangement_id(path)?;
    let reason = body
        .reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| DEFAULT_DISBAND_REASON.to_owned());
    if reason.len() > MAX_REASON_LEN || reason.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "reason must be at most {MAX_REASON_LEN} bytes without control characters"
        )));
    }
    Ok(axum::Json(s.backend.disband(id, reason).await?))
}

async fn policy(State(s): State<AppState>) -> ApiResult<PolicyView> {
    Ok(axum::Json(s.backend.policy().await?))
}

async fn add_rule(
    _: Operator,
    State(s): State<AppState>,
    JsonBody(rule): JsonBody<NewPolicyRule>,
) -> Result<(StatusCode, axum::Json<PolicyRuleView>), ApiError> {
    let subject = rule.subject().map_err(ApiError::bad_request)?;
    let rule = NewPolicyRule {
        action: rule.action,
        fingerprint: match &subject {
            RuleSubject::Fingerprint(fp) => Some(*fp),
            RuleSubject::Organisation(_) => None,
        },
        organisation: match subject {
            RuleSubject::Organisation(org) => Some(org),
            RuleSubject::Fingerprint(_) => None,
        },
    };
    let created = s.backend.add_policy_rule(rule).await?;
    Ok((StatusCode::CREATED, axum::Json(created)))
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Removed {
    pub removed: i64,
}

async fn remove_rule(
    _: Operator,
    State(s): State<AppState>,
    path: Result<Path<i64>, PathRejection>,
) -> ApiResult<Removed> {
    let Path(id) = path.map_err(|_| ApiError::bad_request("rule id must be an integer"))?;
    s.backend.remove_policy_rule(id).await?;
    Ok(axum::Json(Removed { removed: id }))
}

async fn negotiations(State(s): State<AppState>) -> ApiResult<Vec<NegotiationView>> {
    Ok(axum::Json(s.backend.negotiations().await?))
}

async fn negotiate(
    _: Operator,
    State(s): State<AppState>,
    JsonBody(request): JsonBody<NegotiateRequest>,
) -> ApiResult<NegotiationView> {
    request.validate().map_err(ApiError::bad_request)?;
    Ok(axum::Json(s.backend.negotiate(request).await?))
}

/// Prometheus text. The state gauges are refreshed from the backend first, every state set
/// (zero included) so a state that empties does not keep its last count.
async fn render_metrics(State(s): State<AppState>) -> Response {
    match s.backend.status().await {
        Ok(status) => {
            for state in LivenessView::ALL {
                let count = status.peers.get(&state).copied().unwrap_or(0);
                metrics::gauge!(PEERS_GAUGE, "state" => state.as_str()).set(count as f64);
            }
            for state in StateView::ALL {
                let count = status.arrangements.get(&state).copied().unwrap_or(0);
                metrics::gauge!(ARRANGEMENTS_GAUGE, "state" => state.as_str()).set(count as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot refresh state gauges"),
    }
    s.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// Gauge: known peers by liveness (`state` = alive|suspect|dead).
pub const PEERS_GAUGE: &str = "p2pcdn_peers";
/// Gauge: arrangements by state (`state` = requested|…|cancelled).
pub const ARRANGEMENTS_GAUGE: &str = "p2pcdn_arrangements";
/// Counter: finished negotiations by `outcome` (recorded by the negotiation module).
pub const NEGOTIATIONS_COUNTER: &str = "p2pcdn_negotiations_total";
/// Histogram: negotiation durations (recorded by the negotiation module).
pub const NEGOTIATION_DURATION: &str = "p2pcdn_negotiation_duration_seconds";

const NEGOTIATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the Prometheus recorder as the process's global `metrics` recorder, once; later
/// calls return the same handle. If another recorder was installed first (not by this
/// function), the returned handle renders nothing and a warning is logged.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .upkeep_timeout(Duration::from_secs(5))
                .set_buckets_for_metric(
                    Matcher::Full(NEGOTIATION_DURATION.to_owned()),
                    NEGOTIATION_BUCKETS,
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => {
                    metrics::describe_gauge!(PEERS_GAUGE, "Known peers by liveness state.");
                    metrics::describe_gauge!(ARRANGEMENTS_GAUGE, "Arrangements by state.");
                    metrics::describe_counter!(
                        NEGOTIATIONS_COUNTER,
                        "Finished negotiations by outcome."
                    );
                    metrics::describe_histogram!(
                        NEGOTIATION_DURATION,
                        metrics::Unit::Seconds,
                        "Time from requirements to the negotiation's outcome."
                    );
                    handle
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: another recorder is installed; /metrics will be empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            }
        })
        .clone()
}
