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
//! | POST   | /v1/api-tokens                | create an API token ([`ApiTokenRequest`]); the token is in the answer, once |
//! | GET    | /v1/api-tokens                | list API tokens (ids, roles, expiry, revoked; never the tokens) |
//! | POST   | /v1/api-tokens/{id}/revoke    | revoke an API token (on every relay of the cluster at once) |
//! | GET    | /v1/audit[?since=MS][&resource=NAME_OR_ID][&limit=N] | audit records, oldest first |
//! | POST   | /v1/admin-token/rotate        | a new admin token, live on every relay at once; the old one refused ([`crate::admin::admin_token`]) |
//! | GET    | /metrics                      | Prometheus text (no token: keep the admin listener private) |
//!
//! Every route but the health probes and `/metrics` needs a bearer token: the data
//! directory's admin token, or an API token with a role ([`crate::admin::auth`]); each
//! handler asks the scope table for its action, and a `customer` token sees only its
//! customer's things (others' are 404). Every request that changes something (not a
//! GET), and every request refused with 401, 403 or 404, is appended to the audit trail
//! ([`crate::audit`]) with the caller, the action, the target id, the status and the
//! client's address.
//!
//! Errors are `{ "error": "what happened and what to do" }` with a fitting status.
//!
//! With `--admin-tls` (a certificate from the relay's CA) or `--admin-tls-cert`/`--admin-tls-key`
//! the API is served over TLS (the same bounds; the handshake counts against the header
//! timeout); a plain-HTTP request to it is answered 400 with what to do.
//!
//! The listener is bounded ([`crate::limits::Limits`]): at most `--admin-max-connections`
//! connections at once (more are closed at once), request headers within
//! `--admin-header-timeout-secs` (also the keep-alive idle time between requests), and
//! no connection on which nothing moves for `--admin-idle-timeout-secs`. Stalled HTTP
//! clients therefore cannot take the file descriptors the agent and resource ports need.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, FromRequestParts, Path, Query, RawPathParams, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
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

use crate::admin::api_tokens::{ApiTokenCreated, ApiTokenRequest};
use crate::admin::auth::{Action, Caller};
use crate::admin::ops::{AdminError, JwtRequest, LeaseRequest};
use crate::relay::Relay;
use crate::state::store::AdminActionRecord;

/// The admin client's address, put in each request's extensions by [`serve`].
#[derive(Debug, Clone, Copy)]
struct Source(std::net::SocketAddr);

/// The id a request created (a customer, a JWT, an API token), for the audit trail:
/// handlers put it in their response's extensions.
#[derive(Debug, Clone)]
struct AuditTarget(String);

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
pub async fn serve(relay: Arc<Relay>, listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
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
        let (tcp, peer) = match accepted {
            Ok(a) => a,
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
        let app = app.clone().layer(axum::Extension(Source(peer)));
        let (shutdown, idle) = (shutdown.clone(), limits.admin_idle_timeout);
        let Some(acceptor) = tls.clone() else {
            let (io, activity) = Watched::new(tcp);
            let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
            tokio::spawn(async move {
                let _slot = slot;
                serve_connection(conn, activity, idle, shutdown).await;
            });
            continue;
        };
        let (http, handshake_timeout) = (http.clone(), limits.admin_header_timeout);
        tokio::spawn(async move {
            let _slot = slot;
            // The handshake counts against the header timeout: a silent client holds
            // its slot no longer than one that sends no request.
            let Ok(Some(tls)) = tokio::time::timeout(handshake_timeout, accept_tls(&acceptor, tcp, peer)).await else {
                return;
            };
            let (io, activity) = tls;
            let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
            serve_connection(conn, activity, idle, shutdown).await;
        });
    }
}

/// The TLS handshake of one admin connection. A client speaking plain HTTP to the TLS
/// port (its first byte is not a TLS handshake record's, 0x16) is answered with a
/// plain-HTTP 400 saying to use https://, instead of a bare reset.
async fn accept_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: std::net::SocketAddr,
) -> Option<(tokio_rustls::server::TlsStream<Watched<TcpStream>>, Activity)> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await.ok()? == 0 {
        return None;
    }
    if first[0] != 0x16 {
        refuse_plain_http(tcp).await;
        return None;
    }
    let (io, activity) = Watched::new(tcp);
    match acceptor.accept(io).await {
        Ok(tls) => Some((tls, activity)),
        Err(e) => {
            debug!(%peer, error = %e, "admin TLS handshake failed");
            None
        }
    }
}

/// What a plain-HTTP client of the TLS admin port is told.
const PLAIN_HTTP_REFUSAL: &str = "this admin API is served over TLS (the relay runs with --admin-tls or \
                                  --admin-tls-cert): use an https:// admin URL (--admin-url, SLUICE_ADMIN_URL)";

/// Answers a plain-HTTP request on the TLS port. The request head is read first and the
/// client's close awaited after (both bounded by the caller's handshake timeout): closing
/// with unread bytes would make the kernel reset the connection, and the client might
/// see the reset instead of the answer.
async fn refuse_plain_http(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 4096];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_BUF {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = serde_json::json!({ "error": PLAIN_HTTP_REFUSAL }).to_string();
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: \
         close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(answer.as_bytes()).await;
    let _ = tcp.shutdown().await;
    while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
}

type AdminConnection<I> = hyper::server::conn::http1::Connection<TokioIo<I>, TowerToHyperService<Router>>;

/// Serves one connection until it ends, goes idle for `idle`, or the relay shuts down
/// (then its request in flight may finish for [`SHUTDOWN_GRACE`]).
async fn serve_connection<I>(
    conn: AdminConnection<I>,
    activity: Activity,
    idle: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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
        .route("/v1/api-tokens", get(list_api_tokens).post(create_api_token))
        .route("/v1/api-tokens/{id}/revoke", post(revoke_api_token))
        .route("/v1/audit", get(read_audit))
        .route("/v1/admin-token/rotate", post(rotate_admin_token))
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

/// The bearer token of a request, if it carries one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Checks the bearer token (against the store, every request), hands the [`Caller`] to
/// the handler, and appends the request to the audit trail when it changed something
/// or was refused.
async fn require_token(State(relay): State<Arc<Relay>>, req: Request, next: Next) -> Response {
    let source = req.extensions().get::<Source>().map(|s| s.0.to_string()).unwrap_or_default();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let (mut head, body) = req.into_parts();
    let target = RawPathParams::from_request_parts(&mut head, &relay)
        .await
        .ok()
        .and_then(|p| p.iter().next().map(|(_, v)| v.to_owned()));
    let mut req = Request::from_parts(head, body);
    let caller = match bearer(req.headers()) {
        None => Err(AdminError {
            status: 401,
            message: "no token: send `Authorization: Bearer <token>` (CLI: --admin-token or SLUICE_ADMIN_TOKEN) with \
                      the admin token or an API token"
                .into(),
        }),
        Some(t) => relay.authenticate(t),
    };
    let (caller, response) = match caller {
        Err(e) => (None, e.into_response()),
        Ok(c) => {
            req.extensions_mut().insert(c.clone());
            (Some(c), next.run(req).await)
        }
    };
    let status = response.status();
    let refused = matches!(status.as_u16(), 401 | 403 | 404);
    if method == Method::GET && !refused {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let (body, error) = if status.is_success() {
        (axum::body::Body::new(body), None)
    } else {
        // Error answers are small JSON: read the message for the record, send it on.
        let bytes = axum::body::to_bytes(axum::body::Body::new(body), MAX_BUF).await.unwrap_or_default();
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned));
        (axum::body::Body::from(bytes), message)
    };
    let created = parts.extensions.remove::<AuditTarget>().map(|t| t.0);
    let route = format!("{method} {path}");
    relay
        .audit
        .admin(AdminActionRecord {
            token_id: caller.as_ref().map_or("-".into(), |c| c.token_id.clone()),
            role: caller.as_ref().map_or("-".into(), |c| c.role.to_string()),
            customer_id: caller.as_ref().and_then(|c| c.customer_id.clone()),
            action: caller.as_ref().and_then(Caller::asked).map_or_else(|| route.clone(), |a| a.name().to_owned()),
            target: created.or(target),
            route,
            status: status.as_u16(),
            error,
            source,
        })
        .await;
    Response::from_parts(parts, body)
}

/// 404 for what a customer token may not see: answered as if it did not exist.
fn hidden(what: &str, id: &str) -> AdminError {
    AdminError::not_found(format!("no {what} with id {id}"))
}

#[derive(Deserialize)]
struct NewCustomer {
    name: String,
}

type CallerExt = Extension<Caller>;

async fn list_customers(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
) -> ApiResult<Vec<crate::state::store::Customer>> {
    c.require(Action::ListCustomers)?;
    Ok(Json(r.customers()?.into_iter().filter(|x| c.sees(Some(&x.id))).collect()))
}

async fn create_customer(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    body: Result<Json<NewCustomer>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Extension<AuditTarget>, Json<crate::state::store::Customer>), AdminError> {
    c.require(Action::CreateCustomer)?;
    let Json(body) = body.map_err(|e| AdminError::bad_request(format!("expected {{\"name\": …}}: {e}")))?;
    let customer = r.create_customer(&body.name)?;
    Ok((StatusCode::CREATED, Extension(AuditTarget(customer.id.clone())), Json(customer)))
}

async fn issue_jwt(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    body: Result<Json<JwtRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(Extension<AuditTarget>, Json<crate::admin::ops::JwtIssued>), AdminError> {
    let Json(mut body) = body.map_err(|e| AdminError::bad_request(format!("bad registration JWT request: {e}")))?;
    c.require(if body.rotate { Action::RotateResource } else { Action::IssueJwt })?;
    if let Some(rid) = body.resource_id.take() {
        let scope = c.confined_to().map(str::to_owned).or_else(|| body.customer_id.clone());
        body.resource_id = Some(resource_id_of(&r, &rid, scope.as_deref())?);
    }
    if let Some(own) = c.confined_to() {
        if body.org_only {
            return Err(AdminError {
                status: 403,
                message: format!(
                    "a customer token issues registration JWTs for its customer ({own}) only; drop --org-only"
                ),
            });
        }
        if let Some(cid) = body.customer_id.as_deref().filter(|cid| *cid != own) {
            return Err(hidden("customer", cid));
        }
        if let Some(rid) = &body.resource_id
            && !r.store.resource(rid)?.is_some_and(|res| c.sees(res.customer_id.as_deref()))
        {
            return Err(hidden("resource", rid));
        }
        body.customer_id = Some(own.to_owned());
    }
    let issued = r.issue_registration_jwt(&body)?;
    let target = issued.resource_id.clone().unwrap_or_else(|| issued.jti.clone());
    Ok((Extension(AuditTarget(target)), Json(issued)))
}

#[derive(Deserialize)]
struct JwtsQuery {
    customer_id: Option<String>,
}

async fn list_jwts(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Query(mut q): Query<JwtsQuery>,
) -> ApiResult<Vec<crate::admin::ops::RegistrationJwtView>> {
    c.require(Action::ListJwts)?;
    if let Some(own) = c.confined_to() {
        if let Some(cid) = q.customer_id.as_deref().filter(|cid| *cid != own) {
            return Err(hidden("customer", cid));
        }
        q.customer_id = Some(own.to_owned());
    }
    r.registration_jwts(q.customer_id.as_deref()).map(Json)
}

async fn revoke_jwt(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Path(jti): Path<String>,
) -> ApiResult<crate::admin::ops::JwtRevoked> {
    c.require(Action::RevokeJwt)?;
    if c.confined_to().is_some() && !r.store.token(&jti)?.is_some_and(|t| c.sees(t.customer_id.as_deref())) {
        return Err(hidden("registration JWT", &jti));
    }
    r.revoke_registration_jwt(&jti).map(Json)
}

async fn list_resources(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
) -> ApiResult<Vec<crate::admin::ops::ResourceView>> {
    c.require(Action::ListResources)?;
    Ok(Json(r.resource_views()?.into_iter().filter(|v| c.sees(v.customer_id.as_deref())).collect()))
}

#[derive(Deserialize)]
struct ResourceQuery {
    /// Look the name up among this customer's resources only.
    customer_id: Option<String>,
}

async fn get_resource(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Path(id): Path<String>,
    Query(mut q): Query<ResourceQuery>,
) -> ApiResult<crate::admin::ops::ResourceView> {
    c.require(Action::ReadResource)?;
    if let Some(own) = c.confined_to() {
        if q.customer_id.as_deref().is_some_and(|cid| cid != own) {
            return Err(hidden("resource", &id));
        }
        q.customer_id = Some(own.to_owned());
    }
    r.resource_view(&id, q.customer_id.as_deref()).map(Json)
}

/// The id of the resource `id_or_name` names: an id as it is (callers check whose it
/// is), else a name looked up like `GET /v1/resources/{name}` does (within
/// `customer_id` when given; 404 when absent, 409 naming the customers when several
/// have a resource of that name).
fn resource_id_of(r: &Relay, id_or_name: &str, customer_id: Option<&str>) -> Result<String, AdminError> {
    if r.store.resource(id_or_name)?.is_some() {
        return Ok(id_or_name.to_owned());
    }
    Ok(r.resource_view(id_or_name, customer_id)?.id)
}

async fn delete_resource(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Path(id): Path<String>,
    Query(q): Query<ResourceQuery>,
) -> Result<StatusCode, AdminError> {
    c.require(Action::DeleteResource)?;
    let id = resource_id_of(&r, &id, c.confined_to().or(q.customer_id.as_deref()))?;
    if c.confined_to().is_some() && !r.store.resource(&id)?.is_some_and(|res| c.sees(res.customer_id.as_deref())) {
        return Err(hidden("resource", &id));
    }
    r.delete_resource(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct AgentsQuery {
    resource: Option<String>,
}

async fn list_agents(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Query(q): Query<AgentsQuery>,
) -> ApiResult<Vec<crate::admin::ops::AgentView>> {
    c.require(Action::ListAgents)?;
    Ok(Json(r.agent_views(q.resource.as_deref())?.into_iter().filter(|a| c.sees(a.customer_id.as_deref())).collect()))
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
    Extension(c): CallerExt,
    Query(q): Query<StreamsQuery>,
) -> ApiResult<Vec<crate::data::streams::StreamView>> {
    c.require(Action::ListStreams)?;
    let mut list =
        if q.closed { r.streams.closed_views(q.resource.as_deref()) } else { r.streams.views(q.resource.as_deref()) };
    if c.confined_to().is_some() {
        let own: std::collections::HashSet<String> = r
            .store
            .resources()
            .map_err(AdminError::from)?
            .into_iter()
            .filter(|res| c.sees(res.customer_id.as_deref()))
            .map(|res| res.id)
            .collect();
        list.retain(|s| own.contains(&s.resource_id));
    }
    Ok(Json(list))
}

async fn list_relays(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
) -> ApiResult<Vec<crate::admin::relays::RelayView>> {
    c.require(Action::ListRelays)?;
    r.relay_views().map(Json)
}

async fn relay_self(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
) -> ApiResult<crate::admin::relays::RelaySelf> {
    c.require(Action::ListRelays)?;
    Ok(Json(r.relay_self()))
}

async fn drain_relay(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Path(id): Path<String>,
) -> ApiResult<crate::admin::relays::RelayView> {
    c.require(Action::DrainRelay)?;
    r.drain_relay(&id).map(Json)
}

#[derive(Deserialize)]
struct ResourceUpdate {
    access: String,
}

async fn update_resource(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Path(id): Path<String>,
    body: Result<Json<ResourceUpdate>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<crate::admin::ops::ResourceView> {
    c.require(Action::UpdateResource)?;
    let Json(body) =
        body.map_err(|e| AdminError::bad_request(format!("expected {{\"access\": \"leased\"|\"open\"}}: {e}")))?;
    let id = match c.confined_to() {
        // A customer token reaches its own resources only (others': 404, as if absent).
        Some(own) => r.resource_view(&id, Some(own)).map_err(|_| hidden("resource", &id))?.id,
        None => id,
    };
    r.set_resource_access(&id, &body.access).map(Json)
}

async fn create_lease(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Path(id): Path<String>,
    body: Result<Json<LeaseRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<crate::admin::ops::LeaseView>), AdminError> {
    let Json(body) = body.map_err(|e| {
        AdminError::bad_request(format!(
            "expected {{\"ttl_secs\": N, \"max_connections\": N (optional), \"source\": \"CIDR\" (optional)}}: {e}"
        ))
    })?;
    c.require(Action::CreateLease)?;
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
    Extension(c): CallerExt,
    Query(q): Query<LeasesQuery>,
) -> ApiResult<Vec<crate::admin::ops::LeaseView>> {
    c.require(Action::ListLeases)?;
    r.lease_views(q.resource.as_deref()).map(Json)
}

async fn get_lease(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Path(id): Path<String>,
) -> ApiResult<crate::admin::ops::LeaseView> {
    c.require(Action::ListLeases)?;
    r.get_lease(&id).map(Json)
}

async fn delete_lease(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Path(id): Path<String>,
) -> ApiResult<crate::admin::ops::LeaseView> {
    c.require(Action::DeleteLease)?;
    let lease = r.delete_lease(&id)?;
    let _ = crate::data::lease_port::Leases::refresh(&r).await;
    Ok(Json(lease))
}

async fn create_api_token(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    body: Result<Json<ApiTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Extension<AuditTarget>, Json<ApiTokenCreated>), AdminError> {
    c.require(Action::CreateApiToken)?;
    let Json(body) = body.map_err(|e| {
        AdminError::bad_request(format!(
            "bad API token request: {e}; expected {{\"role\": \"admin|operator|platform|customer\", \"customer_id\": …, \
             \"expires_in_secs\": …, \"name\": …}}"
        ))
    })?;
    let created = r.create_api_token(&body)?;
    Ok((StatusCode::CREATED, Extension(AuditTarget(created.record.id.clone())), Json(created)))
}

async fn list_api_tokens(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
) -> ApiResult<Vec<crate::state::store::ApiTokenRecord>> {
    c.require(Action::ListApiTokens)?;
    r.api_tokens().map(Json)
}

async fn revoke_api_token(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Path(id): Path<String>,
) -> ApiResult<crate::state::store::ApiTokenRecord> {
    c.require(Action::RevokeApiToken)?;
    r.revoke_api_token(&id).map(Json)
}

#[derive(Deserialize)]
struct AuditParams {
    /// ms since the epoch.
    #[serde(default)]
    since: u64,
    resource: Option<String>,
    limit: Option<u32>,
}

async fn read_audit(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
    Query(q): Query<AuditParams>,
) -> ApiResult<Vec<crate::state::store::AuditRecord>> {
    c.require(Action::ReadAudit)?;
    r.audit_records(q.since, q.resource.as_deref(), q.limit).map(Json)
}

async fn rotate_admin_token(
    State(r): State<Arc<Relay>>,
    Extension(c): CallerExt,
) -> Result<(Extension<AuditTarget>, Json<crate::admin::admin_token::AdminTokenRotated>), AdminError> {
    c.require(Action::RotateAdminToken)?;
    let rotated = r.rotate_admin_token()?;
    Ok((Extension(AuditTarget(rotated.id.clone())), Json(rotated)))
}

async fn metrics(State(r): State<Arc<Relay>>) -> impl IntoResponse {
    r.streams.sample_rates();
    crate::metrics::key_updates();
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
}
