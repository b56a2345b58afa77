//! The admin HTTP API (JSON, bearer token), listening on `--admin-listen`.
//!
//! | method | path                          | what                                  |
//! |--------|-------------------------------|---------------------------------------|
//! | GET    | /healthz                      | liveness: 200 while the process runs (no token) |
//! | GET    | /readyz                       | readiness: 200 when the store answers and the agent port accepts, else 503 with a reason (no token) |
//! | GET    | /v1/health                    | liveness (no token needed; kept for old probes) |
//! | GET    | /v1/customers                 | list customers                        |
//! | POST   | /v1/customers                 | create `{ "name": … }`                |
//! | POST   | /v1/registration-jwts         | issue a JWT ([`JwtRequest`])          |
//! | GET    | /v1/registration-jwts[?customer_id=ID] | list issued JWTs (ids, agents, revoked) |
//! | POST   | /v1/registration-jwts/{jti}/revoke | revoke one JWT (enrolled agents stay) |
//! | GET    | /v1/resources                 | list resources with live status       |
//! | GET    | /v1/resources/{id_or_name}[?customer_id=ID] | one resource (a name shared by several customers needs `customer_id`) |
//! | DELETE | /v1/resources/{id}            | delete a resource                     |
//! | GET    | /v1/streams[?resource=NAME][&closed=true] | live (or recently closed) streams |
//! | GET    | /v1/agents[?resource=NAME_OR_ID] | connected agents: host, version, peer, data path, service state |
//! | GET    | /v1/relays                    | the cluster's relays: state, version, addresses, heartbeat age |
//! | GET    | /v1/relays/self               | this relay: id, agent sessions, open streams, draining |
//! | POST   | /v1/relays/{id}/drain         | drain relay `id` (any relay of the cluster takes it) |
//! | PATCH  | /v1/resources/{id_or_name} | `{"access": "leased"\|"open"}`: leased-only or open fixed port |
//! | POST   | /v1/resources/{id_or_name}/leases | create an endpoint lease ([`LeaseRequest`]) |
//! | GET    | /v1/leases[?resource=ID_OR_NAME] | active leases and those ended within the hour |
//! | GET    | /v1/leases/{id}               | one lease                             |
//! | DELETE | /v1/leases/{id}               | end a lease now (open streams cut after `--lease-grace`) |
//! | GET    | /metrics                      | Prometheus text (no token: keep the admin listener private) |
//!
//! Errors are `{ "error": "what happened and what to do" }` with a fitting status.
//!
//! The listener is bounded ([`crate::limits::Limits`]): at most `--admin-max-connections`
//! connections at once (more are closed at once), request headers within
//! `--admin-header-timeout-secs` (also the keep-alive idle time between requests), and
//! no connection on which nothing moves for `--admin-idle-timeout-secs`. Stalled HTTP
//! clients therefore cannot take the file descriptors the agent and resource ports need.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::admission::{AcceptBackoff, Activity, Gate, Throttle, Watched};

use crate::admin::ops::{AdminError, JwtRequest, LeaseRequest};
use crate::relay::Relay;

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, AdminError>;

/// Read buffer of one admin connection: request heads larger than this are refused.
const MAX_BUF: usize = 64 << 10;
/// How long connections may finish their requests once the relay shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

static REFUSALS: Throttle = Throttle::new(crate::admission::LOG_EVERY);
static ACCEPT_ERRORS: Throttle = Throttle::new(crate::admission::LOG_EVERY);

/// Serves the admin API until shutdown: accepts within the connection cap, backs off
/// when accepting fails, and serves each connection with the header-read and idle
/// timeouts.
pub async fn serve(relay: Arc<Relay>, listener: TcpListener) {
    let shutdown = relay.shutdown.clone();
    let limits = relay.config.limits.clone();
    let app = router(relay);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.admin_header_timeout).max_buf_size(MAX_BUF);
    let gate = Gate::new("admin", limits.admin_max_connections);
    let mut backoff = AcceptBackoff::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                backoff.after_error("admin", &e, &ACCEPT_ERRORS).await;
                continue;
            }
        };
        backoff.succeeded();
        let Some(slot) = gate.try_admit() else {
            sluice_datapath::reset(&tcp);
            crate::metrics::connection_refused("admin");
            crate::admission::log_refusal(
                &REFUSALS,
                "admin API connections",
                limits.admin_max_connections,
                "--admin-max-connections",
            );
            continue;
        };
        let (io, activity) = Watched::new(tcp);
        let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
        let (shutdown, idle) = (shutdown.clone(), limits.admin_idle_timeout);
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(conn, activity, idle, shutdown).await;
        });
    }
}

type AdminConnection = hyper::server::conn::http1::Connection<TokioIo<Watched<TcpStream>>, TowerToHyperService<Router>>;

/// Serves one connection until it ends, goes idle for `idle`, or the relay shuts down
/// (then its request in flight may finish for [`SHUTDOWN_GRACE`]).
async fn serve_connection(
    conn: AdminConnection,
    activity: Activity,
    idle: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut conn = pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "admin connection ended") },
        _ = activity.idle_for(idle) => debug!(?idle, "admin connection idle: closed"),
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

fn router(relay: Arc<Relay>) -> Router {
    let authed = Router::new()
        .route("/v1/customers", get(list_customers).post(create_customer))
        .route("/v1/registration-jwts", get(list_jwts).post(issue_jwt))
        .route("/v1/registration-jwts/{jti}/revoke", post(revoke_jwt))
        .route("/v1/resources", get(list_resources))
        .route("/v1/streams", get(list_streams))
        .route("/v1/agents", get(list_agents))
        .route("/v1/resources/{id}", get(get_resource).delete(delete_resource).patch(update_resource))
        .route("/v1/resources/{id}/leases", post(create_lease))
        .route("/v1/leases", get(list_leases))
        .route("/v1/leases/{id}", get(get_lease).delete(delete_lease))
        .route("/v1/relays", get(list_relays))
        .route("/v1/relays/self", get(relay_self))
        .route("/v1/relays/{id}/drain", post(drain_relay))
        .route_layer(middleware::from_fn_with_state(relay.clone(), require_token));
    Router::new()
        .route("/v1/health", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .route("/healthz", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(authed)
        .fallback(|| async { AdminError::not_found("no such API path; see docs/admin-api.md") })
        .with_state(relay)
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(relay): State<Arc<Relay>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if same(t.as_bytes(), relay.identity.admin_token.as_bytes()) => next.run(req).await,
        Some(_) => AdminError {
            status: 401,
            message: "the admin token is wrong: use the one the relay printed on first start (stored in its data \
                      directory as admin-token)"
                .into(),
        }
        .into_response(),
        None => AdminError {
            status: 401,
            message: "no admin token: send `Authorization: Bearer <token>` (CLI: --admin-token or SLUICE_ADMIN_TOKEN)"
                .into(),
        }
        .into_response(),
    }
}

#[derive(Deserialize)]
struct NewCustomer {
    name: String,
}

async fn list_customers(State(r): State<Arc<Relay>>) -> ApiResult<Vec<crate::state::store::Customer>> {
    r.customers().map(Json)
}

async fn create_customer(
    State(r): State<Arc<Relay>>,
    body: Result<Json<NewCustomer>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<crate::state::store::Customer>), AdminError> {
    let Json(body) = body.map_err(|e| AdminError::bad_request(format!("expected {{\"name\": …}}: {e}")))?;
    Ok((StatusCode::CREATED, Json(r.create_customer(&body.name)?)))
}

async fn issue_jwt(
    State(r): State<Arc<Relay>>,
    body: Result<Json<JwtRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<crate::admin::ops::JwtIssued> {
    let Json(body) = body.map_err(|e| AdminError::bad_request(format!("bad registration JWT request: {e}")))?;
    r.issue_registration_jwt(&body).map(Json)
}

#[derive(Deserialize)]
struct JwtsQuery {
    customer_id: Option<String>,
}

async fn list_jwts(
    State(r): State<Arc<Relay>>,
    Query(q): Query<JwtsQuery>,
) -> ApiResult<Vec<crate::admin::ops::RegistrationJwtView>> {
    r.registration_jwts(q.customer_id.as_deref()).map(Json)
}

async fn revoke_jwt(State(r): State<Arc<Relay>>, Path(jti): Path<String>) -> ApiResult<crate::admin::ops::JwtRevoked> {
    r.revoke_registration_jwt(&jti).map(Json)
}

async fn list_resources(State(r): State<Arc<Relay>>) -> ApiResult<Vec<crate::admin::ops::ResourceView>> {
    r.resource_views().map(Json)
}

#[derive(Deserialize)]
struct ResourceQuery {
    /// Look the name up among this customer's resources only.
    customer_id: Option<String>,
}

async fn get_resource(
    State(r): State<Arc<Relay>>,
    Path(id): Path<String>,
    Query(q): Query<ResourceQuery>,
) -> ApiResult<crate::admin::ops::ResourceView> {
    r.resource_view(&id, q.customer_id.as_deref()).map(Json)
}

async fn delete_resource(State(r): State<Arc<Relay>>, Path(id): Path<String>) -> Result<StatusCode, AdminError> {
    r.delete_resource(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct AgentsQuery {
    resource: Option<String>,
}

async fn list_agents(
    State(r): State<Arc<Relay>>,
    Query(q): Query<AgentsQuery>,
) -> ApiResult<Vec<crate::admin::ops::AgentView>> {
    r.agent_views(q.resource.as_deref()).map(Json)
}

#[derive(Deserialize)]
struct StreamsQuery {
    resource: Option<String>,
    /// `true`: the recently closed streams instead of the open ones.
    #[serde(default)]
    closed: bool,
}

async fn list_streams(
    State(r): State<Arc<Relay>>,
    Query(q): Query<StreamsQuery>,
) -> ApiResult<Vec<crate::data::streams::StreamView>> {
    Ok(Json(if q.closed {
        r.streams.closed_views(q.resource.as_deref())
    } else {
        r.streams.views(q.resource.as_deref())
    }))
}

async fn list_relays(State(r): State<Arc<Relay>>) -> ApiResult<Vec<crate::admin::relays::RelayView>> {
    r.relay_views().map(Json)
}

async fn relay_self(State(r): State<Arc<Relay>>) -> Json<crate::admin::relays::RelaySelf> {
    Json(r.relay_self())
}

async fn drain_relay(
    State(r): State<Arc<Relay>>,
    Path(id): Path<String>,
) -> ApiResult<crate::admin::relays::RelayView> {
    r.drain_relay(&id).map(Json)
}

#[derive(Deserialize)]
struct ResourceUpdate {
    access: String,
}

async fn update_resource(
    State(r): State<Arc<Relay>>,
    Path(id): Path<String>,
    body: Result<Json<ResourceUpdate>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<crate::admin::ops::ResourceView> {
    let Json(body) =
        body.map_err(|e| AdminError::bad_request(format!("expected {{\"access\": \"leased\"|\"open\"}}: {e}")))?;
    r.set_resource_access(&id, &body.access).map(Json)
}

async fn create_lease(
    State(r): State<Arc<Relay>>,
    Path(id): Path<String>,
    body: Result<Json<LeaseRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<crate::admin::ops::LeaseView>), AdminError> {
    let Json(body) = body.map_err(|e| {
        AdminError::bad_request(format!(
            "expected {{\"ttl_secs\": N, \"max_connections\": N (optional), \"source\": \"CIDR\" (optional)}}: {e}"
        ))
    })?;
    let lease = r.create_lease(&id, &body)?;
    // Its port listens (where this relay has an agent of the resource) before the answer.
    let _ = crate::data::lease_port::Leases::refresh(&r).await;
    Ok((StatusCode::CREATED, Json(lease)))
}

#[derive(Deserialize)]
struct LeasesQuery {
    resource: Option<String>,
}

async fn list_leases(
    State(r): State<Arc<Relay>>,
    Query(q): Query<LeasesQuery>,
) -> ApiResult<Vec<crate::admin::ops::LeaseView>> {
    r.lease_views(q.resource.as_deref()).map(Json)
}

async fn get_lease(State(r): State<Arc<Relay>>, Path(id): Path<String>) -> ApiResult<crate::admin::ops::LeaseView> {
    r.get_lease(&id).map(Json)
}

async fn delete_lease(State(r): State<Arc<Relay>>, Path(id): Path<String>) -> ApiResult<crate::admin::ops::LeaseView> {
    let lease = r.delete_lease(&id)?;
    let _ = crate::data::lease_port::Leases::refresh(&r).await;
    Ok(Json(lease))
}

async fn metrics(State(r): State<Arc<Relay>>) -> impl IntoResponse {
    r.streams.sample_rates();
    let mut text = r.metrics.render();
    match r.store.resources() {
        Ok(resources) => text.push_str(&crate::metrics::resource_info(&resources)),
        Err(e) => warn!(error = %e, "sluice_resource_info left out of /metrics: the store did not answer"),
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// `/readyz`: can the relay do its job now? The store must answer a trivial query (and
/// its file must be the one the relay opened, see [`crate::state::store_watch`]) and
/// the agent port's accept loop must run.
async fn readyz(State(r): State<Arc<Relay>>) -> Response {
    let store = match r.store_health.fault() {
        Some(fault) => Err(fault),
        None => r.store.customer("readiness-probe").map(|_| ()).map_err(|e| e.to_string()),
    };
    let accepting = r.agent_listener_up.load(std::sync::atomic::Ordering::Relaxed);
    let (status, body) = readiness(store, accepting, r.shutdown.is_cancelled());
    (status, Json(body)).into_response()
}

/// The readiness decision, apart from where its inputs come from.
fn readiness(store: Result<(), String>, agent_port_accepting: bool, shutting_down: bool) -> (StatusCode, Value) {
    let reason = if shutting_down {
        "the relay is shutting down".to_owned()
    } else if let Err(e) = store {
        format!("the store does not answer ({e}); check the database (--database-url) and the data directory")
    } else if !agent_port_accepting {
        "the agent port (--agent-listen) stopped accepting connections; see the relay's log and restart it".to_owned()
    } else {
        return (StatusCode::OK, serde_json::json!({ "status": "ready" }));
    };
    (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "status": "not_ready", "reason": reason }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_store_and_agent_port() {
        assert_eq!(readiness(Ok(()), true, false).0, StatusCode::OK);
        let (status, body) = readiness(Err("disk I/O error".into()), true, false);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["reason"].as_str().unwrap().contains("disk I/O error"), "{body}");
        let (status, body) = readiness(Ok(()), false, false);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["reason"].as_str().unwrap().contains("agent port"), "{body}");
        assert_eq!(readiness(Ok(()), true, true).0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
