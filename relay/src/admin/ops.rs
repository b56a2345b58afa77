//! Operator actions — customers, registration JWTs (issue with rotation, list, revoke),
//! resources — as plain methods on [`Relay`], used by the admin HTTP API and by
//! `sluice quickstart`.

use serde::{Deserialize, Serialize};
use sluice_proto::identity::{
    AgentId, JWT_AUDIENCE, JWT_ISSUER, RegistrationClaims, ResourceId, SessionId, printable, unix_now,
};
use tracing::{error, info, warn};

use crate::data::agent_port::new_id;
use crate::data::registry::PortState;
use crate::relay::Relay;
use crate::state::store::{Customer, Resource, StoreError, TokenRecord, TokenRevocation};

/// An operator-facing failure: an HTTP status and a message that says what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AdminError {}

impl AdminError {
    pub fn bad_request(m: impl Into<String>) -> Self {
        AdminError { status: 400, message: m.into() }
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        AdminError { status: 404, message: m.into() }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => AdminError { status: 409, message: m },
            StoreError::Exhausted(m) => AdminError { status: 507, message: m },
            StoreError::Quota(m) => AdminError { status: 429, message: m },
            StoreError::Db(e) => {
                warn!(error = %e, "store error");
                AdminError { status: 500, message: format!("the relay's store failed: {e}") }
            }
            StoreError::Unavailable(m) => {
                error!("store error: {m}");
                AdminError { status: 503, message: format!("the relay's store failed: {m}") }
            }
        }
    }
}

/// The longest lifetime a registration JWT may be given: 100 years. A longer one is a
/// mistake (a unit typo) and, near `u64::MAX`, would overflow into an expired token.
pub const MAX_JWT_LIFETIME_SECS: u64 = 100 * 365 * 86_400;

/// Checks a registration JWT lifetime in seconds: at least 1, at most 100 years.
pub fn check_jwt_lifetime(secs: u64) -> Result<u64, String> {
    match secs {
        0 => Err("a registration JWT lifetime must be at least 1 second; for one that never expires, give none".into()),
        s if s > MAX_JWT_LIFETIME_SECS => Err(format!(
            "a registration JWT lifetime of {s} seconds is more than 100 years; give a shorter one (e.g. 7d), or none \
             for a JWT that never expires"
        )),
        s => Ok(s),
    }
}

/// When a JWT issued at `now` with `expires_in_secs` expires (`None`: never). A zero,
/// absurd or overflowing lifetime is refused, never turned into an expired token.
pub fn jwt_expiry(now: u64, expires_in_secs: Option<u64>) -> Result<Option<u64>, AdminError> {
    let Some(secs) = expires_in_secs else { return Ok(None) };
    let secs = check_jwt_lifetime(secs).map_err(|m| AdminError::bad_request(format!("expires_in_secs: {m}")))?;
    now.checked_add(secs).map(Some).ok_or_else(|| {
        AdminError::bad_request(format!("expires_in_secs: {secs} seconds from now does not fit a JWT expiry time"))
    })
}

/// A request for a registration JWT.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JwtRequest {
    /// Agents register resources of this customer.
    #[serde(default)]
    pub customer_id: Option<String>,
    /// Agents register org-level resources (no customer).
    #[serde(default)]
    pub org_only: bool,
    /// Regenerate the JWT of this existing resource.
    #[serde(default)]
    pub resource_id: Option<String>,
    /// With `resource_id`: revoke every older JWT and certificate of the resource first.
    #[serde(default)]
    pub rotate: bool,
    /// Lifetime in seconds (1 to [`MAX_JWT_LIFETIME_SECS`]); absent means no expiry.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
}

/// An issued registration JWT.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JwtIssued {
    pub jwt: String,
    pub jti: String,
    pub customer_id: Option<String>,
    pub resource_id: Option<String>,
    pub generation: Option<u64>,
    pub expires_at: Option<u64>,
    /// Agents disconnected by a rotation.
    pub disconnected_agents: usize,
    /// With `rotate`: the resource's own JWTs that were revoked (ids).
    #[serde(default)]
    pub revoked_resource_jwts: Vec<String>,
    /// With `rotate`: customer or org-level JWTs (ids) that had enrolled agents of the
    /// resource; they can no longer enroll agents for it but stay valid for others.
    #[serde(default)]
    pub blocked_for_resource_jwts: Vec<String>,
}

/// A registration JWT as operators see it (never the JWT itself: only its id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationJwtView {
    pub jti: String,
    pub customer_id: Option<String>,
    pub customer_name: Option<String>,
    /// Set for a JWT issued for one resource (`--resource-id`).
    pub resource_id: Option<String>,
    pub issued_at: u64,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
    /// Agents on record that enrolled with it.
    pub agents: u64,
}

/// What revoking one registration JWT did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JwtRevoked {
    pub jti: String,
    /// False when it had been revoked before: nothing changed.
    pub newly_revoked: bool,
    pub revoked_at: u64,
    /// Resources whose agents enrolled with it. Those agents stay connected (their
    /// certificate is their identity); rotate these resources to cut them off.
    pub agent_resource_ids: Vec<String>,
}

/// Whom a registration JWT is for: the customer, the resource (if any), and what a
/// rotation did (agents disconnected, JWTs revoked).
type JwtSubject = (Option<String>, Option<Resource>, Option<(usize, crate::state::store::ResourceRevocation)>);

/// Whether a resource can be reached now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// At least one agent is connected and (as far as its agents know) the private
    /// service accepts connections.
    Available,
    /// Agents are connected, but every one of them reports that the private service
    /// refuses connections (see `service_error`).
    ServiceUnreachable,
    /// An agent is connected but the resource's port is not listening (another process
    /// holds it); the relay keeps retrying, and `port_error` says why.
    PortBlocked,
    /// Agents registered before, none is connected now.
    Unavailable,
    /// No agent has connected yet.
    Pending,
}

/// A resource as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceView {
    pub id: String,
    pub name: String,
    pub status: Status,
    pub customer_id: Option<String>,
    pub customer_name: Option<String>,
    /// `host:port` platform jobs connect to.
    pub endpoint: String,
    /// Connected agents.
    pub agents: usize,
    pub generation: u64,
    pub last_seen_at: Option<u64>,
    /// Why the service is unreachable (the agent's last connection error), when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_error: Option<String>,
    /// Why the resource's port does not listen although an agent is connected
    /// (with [`Status::PortBlocked`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_error: Option<String>,
    /// In a cluster: agent sessions per relay id (filled by the CLI, which asks every
    /// relay; `agents` is the answering relay's own count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents_by_relay: Option<std::collections::BTreeMap<String, usize>>,
    /// `open` (the fixed port admits every connection) or `leased` (only lease ports do).
    #[serde(default = "open_access")]
    pub access: String,
}

fn open_access() -> String {
    "open".into()
}

/// A connected agent as operators see it (`sluice agents list`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentView {
    pub agent_id: AgentId,
    pub session_id: SessionId,
    pub resource_id: ResourceId,
    pub resource_name: String,
    pub customer_id: Option<String>,
    pub hostname: String,
    pub agent_version: String,
    /// Where the agent's control connection comes from.
    pub peer: String,
    pub connected_at: u64,
    /// How its streams move bytes: `ktls_splice` when its kernel took TLS, else `userspace`.
    pub data_path: String,
    /// Who counts its stream bytes: `ebpf` or `userspace`.
    pub counter: String,
    /// `reachable`, `unreachable`, or `unknown` (not reported yet, or an older agent).
    pub service: String,
    /// The agent's last error connecting to the private service.
    pub last_error: Option<String>,
    /// Other live sessions with the same agent identity (a copied STATE_DIR).
    pub shared_identity_with: Vec<String>,
}

impl Relay {
    pub fn create_customer(&self, name: &str) -> Result<Customer, AdminError> {
        let name = sluice_proto::identity::validate_resource_name(name)
            .map_err(|e| AdminError::bad_request(format!("the customer name is not valid: {e}")))?;
        let c = self.store.create_customer(&new_id("cus"), name, unix_now())?;
        info!(customer = %c.id, name = %c.name, "customer created");
        Ok(c)
    }

    pub fn customers(&self) -> Result<Vec<Customer>, AdminError> {
        Ok(self.store.customers()?)
    }

    /// Issues a registration JWT; with `rotate`, first cuts off everything older.
    pub fn issue_registration_jwt(&self, req: &JwtRequest) -> Result<JwtIssued, AdminError> {
        // Refuse a bad lifetime before anything changes (a rotation must not half happen).
        jwt_expiry(unix_now(), req.expires_in_secs)?;
        let (customer_id, resource, rotated) = self.jwt_subject(req)?;
        let now = unix_now();
        let jti = new_id("jwt");
        let expires_at = jwt_expiry(now, req.expires_in_secs)?;
        let claims = RegistrationClaims {
            iss: JWT_ISSUER.into(),
            aud: JWT_AUDIENCE.into(),
            jti: jti.clone(),
            iat: now,
            exp: expires_at,
            customer_id: customer_id.clone(),
            resource_id: resource.as_ref().map(|r| r.id.clone()),
            generation: resource.as_ref().map(|r| r.generation),
            relay_url: self.public_url.to_string(),
            ca_pin: self.identity.ca_pin.clone(),
        };
        self.store.record_token(&TokenRecord {
            jti: jti.clone(),
            customer_id: customer_id.clone(),
            resource_id: claims.resource_id.clone(),
            issued_at: now,
            expires_at,
            revoked_at: None,
        })?;
        info!(%jti, customer = customer_id.as_deref(), resource = claims.resource_id.as_deref(), "registration JWT issued");
        Ok(JwtIssued {
            jwt: self.signer.sign(&claims),
            jti,
            customer_id,
            resource_id: claims.resource_id,
            generation: claims.generation,
            expires_at,
            disconnected_agents: rotated.as_ref().map_or(0, |(n, _)| *n),
            revoked_resource_jwts: rotated.as_ref().map(|(_, r)| r.revoked_resource_jwts.clone()).unwrap_or_default(),
            blocked_for_resource_jwts: rotated.map(|(_, r)| r.blocked_for_resource_jwts).unwrap_or_default(),
        })
    }

    /// Whom a JWT request is for — a customer, the org, or an existing resource (rotated
    /// first when asked) — after checking that the pieces of the request fit together.
    fn jwt_subject(&self, req: &JwtRequest) -> Result<JwtSubject, AdminError> {
        Ok(match (&req.resource_id, &req.customer_id, req.org_only) {
            (Some(rid), cid, org_only) => {
                let r = self.store.resource(rid)?.ok_or_else(|| {
                    AdminError::not_found(format!("no resource with id {rid}; see `sluice resources list --extended`"))
                })?;
                if let Some(cid) = cid
                    && r.customer_id.as_ref() != Some(cid)
                {
                    return Err(AdminError {
                        status: 403,
                        message: format!("resource {rid} does not belong to customer {cid}"),
                    });
                }
                if org_only && r.customer_id.is_some() {
                    return Err(AdminError::bad_request(format!(
                        "resource {rid} belongs to a customer; drop --org-only"
                    )));
                }
                if req.rotate {
                    let (generation, revoked) = self.store.rotate_resource(rid, unix_now())?;
                    let n = self.registry.revoke(
                        rid,
                        Some(generation),
                        &format!(
                            "resource {rid} was rotated: this agent's certificate is revoked, and its registration \
                         JWT can no longer enroll agents for {rid}"
                        ),
                    );
                    info!(
                        resource = %rid, generation, disconnected_agents = n,
                        revoked_resource_jwts = %revoked.revoked_resource_jwts.join(","),
                        blocked_for_resource_jwts = %revoked.blocked_for_resource_jwts.join(","),
                        "resource rotated"
                    );
                    let r =
                        self.store.resource(rid)?.ok_or_else(|| AdminError::not_found("resource deleted meanwhile"))?;
                    (r.customer_id.clone(), Some(r), Some((n, revoked)))
                } else {
                    (r.customer_id.clone(), Some(r), None)
                }
            }
            (None, _, _) if req.rotate => {
                return Err(AdminError::bad_request("--rotate needs --resource-id: rotation is per resource"));
            }
            (None, Some(_), true) => {
                return Err(AdminError::bad_request("give either --customer-id or --org-only, not both"));
            }
            (None, Some(cid), false) => {
                if self.store.customer(cid)?.is_none() {
                    return Err(AdminError::not_found(format!(
                        "no customer with id {cid}; see `sluice customers list`"
                    )));
                }
                (Some(cid.clone()), None, None)
            }
            (None, None, true) => (None, None, None),
            (None, None, false) => {
                return Err(AdminError::bad_request(
                    "say who the token is for: --customer-id ID, --org-only, or --resource-id ID",
                ));
            }
        })
    }

    /// Every registration JWT issued (of one customer, when given), oldest first.
    pub fn registration_jwts(&self, customer_id: Option<&str>) -> Result<Vec<RegistrationJwtView>, AdminError> {
        let customers = self.store.customers()?;
        if let Some(cid) = customer_id
            && !customers.iter().any(|c| c.id == cid)
        {
            return Err(AdminError::not_found(format!("no customer with id {cid}; see `sluice customers list`")));
        }
        Ok(self
            .store
            .tokens(customer_id)?
            .into_iter()
            .map(|u| RegistrationJwtView {
                customer_name: u
                    .token
                    .customer_id
                    .as_ref()
                    .and_then(|c| customers.iter().find(|x| &x.id == c))
                    .map(|c| c.name.clone()),
                jti: u.token.jti,
                customer_id: u.token.customer_id,
                resource_id: u.token.resource_id,
                issued_at: u.token.issued_at,
                expires_at: u.token.expires_at,
                revoked_at: u.token.revoked_at,
                agents: u.agents,
            })
            .collect())
    }

    /// Revokes one registration JWT: no agent can enroll with it any more. Agents that
    /// enrolled with it keep their certificates and stay connected.
    pub fn revoke_registration_jwt(&self, jti: &str) -> Result<JwtRevoked, AdminError> {
        let (record, newly_revoked) = match self.store.revoke_token(jti, unix_now())? {
            TokenRevocation::Unknown => {
                return Err(AdminError::not_found(format!(
                    "no registration JWT with id {jti}; see `sluice tokens list` (the id is the JWT's jti, e.g. jwt_…)"
                )));
            }
            TokenRevocation::Revoked(t) => (t, true),
            TokenRevocation::AlreadyRevoked(t) => (t, false),
        };
        let agent_resource_ids = self.store.resources_enrolled_with(jti)?;
        if newly_revoked {
            info!(%jti, agent_resources = %agent_resource_ids.join(","), "registration JWT revoked");
        }
        Ok(JwtRevoked {
            jti: record.jti,
            newly_revoked,
            revoked_at: record.revoked_at.unwrap_or_default(),
            agent_resource_ids,
        })
    }

    fn view(&self, r: Resource, customers: &[Customer]) -> Result<ResourceView, AdminError> {
        let sessions = self.registry.sessions_of(&r.id);
        let agents = sessions.len();
        let reports: Vec<_> = sessions.iter().map(|s| s.service.lock().clone()).collect();
        let refusing = agents > 0 && reports.iter().all(|s| s.reachable == Some(false));
        let service_error =
            refusing.then(|| reports.iter().max_by_key(|s| s.at).and_then(|s| s.error.clone())).flatten();
        // A blocked port comes first: no platform job gets through, whatever the service does.
        let access = if self.leases.is_leased_only(&r.id) { "leased" } else { "open" }.into();
        let port_error = match self.registry.port_state(&r.id) {
            Some(PortState::Blocked(why)) if agents > 0 => Some(why),
            _ => None,
        };
        let status = if port_error.is_some() {
            Status::PortBlocked
        } else if refusing {
            Status::ServiceUnreachable
        } else if agents > 0 {
            Status::Available
        } else if self.store.agents_ever_connected(&r.id)? {
            Status::Unavailable
        } else {
            Status::Pending
        };
        Ok(ResourceView {
            customer_name: r
                .customer_id
                .as_ref()
                .and_then(|c| customers.iter().find(|x| &x.id == c))
                .map(|c| c.name.clone()),
            endpoint: self.endpoint(r.port),
            last_seen_at: if agents > 0 { Some(unix_now()) } else { r.last_seen_at },
            id: r.id,
            name: r.name,
            status,
            customer_id: r.customer_id,
            agents,
            generation: r.generation,
            service_error,
            port_error,
            agents_by_relay: None,
            access,
        })
    }

    /// Every connected agent (of one resource, by id or name, when given).
    pub fn agent_views(&self, resource: Option<&str>) -> Result<Vec<AgentView>, AdminError> {
        let resources = self.store.resources()?;
        let wanted: Option<Vec<&Resource>> = resource.map(|q| {
            let q = q.trim();
            resources.iter().filter(|r| r.id == q || r.name == q).collect()
        });
        if let (Some(q), Some(w)) = (resource, &wanted)
            && w.is_empty()
        {
            return Err(AdminError::not_found(format!(
                "no resource with id or name {:?}; see `sluice resources list`",
                printable(q)
            )));
        }
        let sessions = self.registry.all_sessions();
        Ok(sessions
            .iter()
            .filter(|s| wanted.as_ref().is_none_or(|w| w.iter().any(|r| s.resource_id == r.id.as_str())))
            .map(|s| {
                let r = resources.iter().find(|r| s.resource_id == r.id.as_str());
                let report = s.service.lock().clone();
                let caps = &s.info.capabilities;
                AgentView {
                    agent_id: s.agent_id.clone(),
                    session_id: s.id.clone(),
                    resource_id: s.resource_id.clone(),
                    resource_name: r.map(|r| r.name.clone()).unwrap_or_default(),
                    customer_id: r.and_then(|r| r.customer_id.clone()),
                    hostname: s.hostname.clone(),
                    agent_version: s.info.agent_version.clone(),
                    peer: s.info.peer.map(|p| p.to_string()).unwrap_or_default(),
                    connected_at: s.connected_at,
                    data_path: if caps.ktls { "ktls_splice" } else { "userspace" }.into(),
                    counter: if caps.ebpf { "ebpf" } else { "userspace" }.into(),
                    service: match report.reachable {
                        Some(true) => "reachable",
                        Some(false) => "unreachable",
                        None => "unknown",
                    }
                    .into(),
                    last_error: report.error,
                    shared_identity_with: sessions
                        .iter()
                        .filter(|o| o.agent_id == s.agent_id && o.id != s.id)
                        .map(|o| {
                            format!(
                                "{} ({}, {})",
                                o.id,
                                o.hostname,
                                o.info.peer.map(|p| p.to_string()).unwrap_or_default()
                            )
                        })
                        .collect(),
                }
            })
            .collect())
    }

    pub fn resource_views(&self) -> Result<Vec<ResourceView>, AdminError> {
        let customers = self.store.customers()?;
        self.store.resources()?.into_iter().map(|r| self.view(r, &customers)).collect()
    }

    /// Finds a resource by id, or by its display name: within `customer_id` when given,
    /// else when only one customer has a resource of that name. Names are compared after
    /// trimming, exactly as agents register them.
    pub fn resource_view(&self, id_or_name: &str, customer_id: Option<&str>) -> Result<ResourceView, AdminError> {
        let customers = self.store.customers()?;
        if let Some(r) = self.store.resource(id_or_name)?
            && customer_id.is_none_or(|c| r.customer_id.as_deref() == Some(c))
        {
            return self.view(r, &customers);
        }
        let name = id_or_name.trim();
        let mut named: Vec<Resource> = self
            .store
            .resources()?
            .into_iter()
            .filter(|r| r.name == name && customer_id.is_none_or(|c| r.customer_id.as_deref() == Some(c)))
            .collect();
        match named.len() {
            0 => Err(AdminError::not_found(match customer_id {
                Some(c) => format!(
                    "customer {c} has no resource with id or name {:?}; see `sluice resources list --extended`",
                    printable(name)
                ),
                None => format!("no resource with id or name {:?}; see `sluice resources list`", printable(name)),
            })),
            1 => self.view(named.remove(0), &customers),
            _ => {
                let owners: Vec<String> = named
                    .iter()
                    .map(|r| match &r.customer_id {
                        Some(c) => {
                            let cname = customers.iter().find(|x| &x.id == c).map(|x| x.name.as_str()).unwrap_or("?");
                            format!("{c} ({cname}): {}", r.id)
                        }
                        None => format!("org-level: {}", r.id),
                    })
                    .collect();
                Err(AdminError {
                    status: 409,
                    message: format!(
                        "{} customers have a resource named {name:?} ({}); say which with --customer-id ID \
                         (API: ?customer_id=ID), or give the resource id",
                        named.len(),
                        owners.join("; ")
                    ),
                })
            }
        }
    }

    /// Deletes a resource: its port closes, its agents are cut off, its own JWTs are
    /// revoked, and customer JWTs that enrolled its agents can no longer enroll into it
    /// (a new resource of the same NAME gets a new id, which they may enroll into).
    pub fn delete_resource(&self, id: &str) -> Result<(), AdminError> {
        let Some(revoked) = self.store.delete_resource(id, unix_now())? else {
            return Err(AdminError::not_found(format!(
                "no resource with id {id}; see `sluice resources list --extended`"
            )));
        };
        let n = self.registry.revoke(id, None, &format!("resource {id} was deleted"));
        info!(
            resource = %id, disconnected_agents = n,
            revoked_resource_jwts = %revoked.revoked_resource_jwts.join(","),
            blocked_for_resource_jwts = %revoked.blocked_for_resource_jwts.join(","),
            "resource deleted"
        );
        Ok(())
    }
}

/// The shortest and longest lease lifetimes.
pub const LEASE_TTL_SECS: std::ops::RangeInclusive<u64> = 1..=86_400;

/// A request for an endpoint lease (`POST /v1/resources/{id}/leases`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// Lifetime in seconds, 1 to 86400 (24 h).
    pub ttl_secs: u64,
    /// Connections the lease admits in all; absent: no budget (until it ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// The network its connections must come from (CIDR, e.g. 10.1.2.3/32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A lease as operators and platforms see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseView {
    pub id: String,
    pub resource_id: String,
    /// `host:port` the lease holder connects to.
    pub endpoint: String,
    pub port: u16,
    /// `active` or `ended`.
    pub state: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub max_connections: Option<u32>,
    pub connections_used: u64,
    pub source: Option<String>,
    pub ended_at: Option<u64>,
    /// `expired`, `deleted` or `spent`.
    pub end_reason: Option<String>,
    /// Streams open under it on the relay that answered.
    #[serde(default)]
    pub open_streams: usize,
}

/// How long ended leases stay listed.
const ENDED_LEASES_LISTED_SECS: u64 = 3600;

impl Relay {
    fn lease_view(&self, l: crate::state::store::Lease) -> LeaseView {
        let now = unix_now();
        let (ended_at, end_reason) = match (l.ended_at, l.expires_at <= now) {
            (None, true) => (Some(l.expires_at), Some("expired".to_owned())),
            _ => (l.ended_at, l.end_reason),
        };
        LeaseView {
            open_streams: self.leases.open_streams(&l.id),
            endpoint: self.endpoint(l.port),
            state: if ended_at.is_some() { "ended" } else { "active" }.into(),
            id: l.id,
            resource_id: l.resource_id,
            port: l.port,
            created_at: l.created_at,
            expires_at: l.expires_at,
            max_connections: l.max_connections,
            connections_used: l.connections_used,
            source: l.source,
            ended_at,
            end_reason,
        }
    }

    /// Creates a lease for one platform execution on the resource `id_or_name`.
    pub fn create_lease(&self, id_or_name: &str, req: &LeaseRequest) -> Result<LeaseView, AdminError> {
        if !LEASE_TTL_SECS.contains(&req.ttl_secs) {
            return Err(AdminError::bad_request(format!(
                "ttl_secs: {} is out of bounds: a lease lives 1 second to 24 hours (86400); give the execution's \
                 expected length",
                req.ttl_secs
            )));
        }
        if req.max_connections == Some(0) {
            return Err(AdminError::bad_request(
                "max_connections: 0 would admit nobody; give at least 1, or none for no budget",
            ));
        }
        let source = match req.source.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(
                s.parse::<crate::data::lease_port::SourceNet>()
                    .map_err(|e| AdminError::bad_request(format!("source: {e}")))?
                    .to_string(),
            ),
        };
        let resource = self.resource_view(id_or_name, None)?;
        let now = unix_now();
        let new = crate::state::store::NewLease {
            id: new_id("lse"),
            resource_id: resource.id.clone(),
            created_at: now,
            expires_at: now + req.ttl_secs,
            max_connections: req.max_connections,
            source,
        };
        let lease = self.store.create_lease(
            &new,
            self.config.lease_ports.clone(),
            self.config.limits.max_leases_per_resource,
        )?;
        info!(lease = %lease.id, resource = %resource.id, port = lease.port, ttl_secs = req.ttl_secs,
              max_connections = lease.max_connections, source = lease.source.as_deref(), "lease created");
        Ok(self.lease_view(lease))
    }

    /// The active leases and those ended within the last hour (of one resource, by id or
    /// name, when given).
    pub fn lease_views(&self, resource: Option<&str>) -> Result<Vec<LeaseView>, AdminError> {
        let rid = match resource {
            Some(r) => Some(self.resource_view(r, None)?.id),
            None => None,
        };
        let since = unix_now().saturating_sub(ENDED_LEASES_LISTED_SECS);
        Ok(self.store.leases(rid.as_deref(), since)?.into_iter().map(|l| self.lease_view(l)).collect())
    }

    pub fn get_lease(&self, id: &str) -> Result<LeaseView, AdminError> {
        match self.store.lease(id)? {
            Some(l) => Ok(self.lease_view(l)),
            None => {
                Err(AdminError::not_found(format!("no lease with id {:?}; see `sluice leases list`", printable(id))))
            }
        }
    }

    /// Ends a lease now: its port refuses new connections at once (on every relay within
    /// the refresh bound) and its open streams are cut after `--lease-grace`.
    pub fn delete_lease(&self, id: &str) -> Result<LeaseView, AdminError> {
        match self.store.end_lease(id, "deleted", unix_now())? {
            Some(l) => {
                info!(lease = %l.id, resource = %l.resource_id, "lease deleted");
                Ok(self.lease_view(l))
            }
            None => {
                Err(AdminError::not_found(format!("no lease with id {:?}; see `sluice leases list`", printable(id))))
            }
        }
    }

    /// Sets a resource's access: `leased` (its fixed port refuses every connection;
    /// platform jobs connect through leases) or `open`.
    pub fn set_resource_access(&self, id_or_name: &str, access: &str) -> Result<ResourceView, AdminError> {
        let leased_only = match access {
            "leased" => true,
            "open" => false,
            other => {
                return Err(AdminError::bad_request(format!(
                    "access: {:?} is not an access mode: give \"leased\" or \"open\"",
                    printable(other)
                )));
            }
        };
        let r = self.resource_view(id_or_name, None)?;
        if !self.store.set_resource_leased_only(&r.id, leased_only)? {
            return Err(AdminError::not_found(format!("resource {} was deleted meanwhile", r.id)));
        }
        self.leases.set_leased_only(&r.id, leased_only);
        info!(resource = %r.id, name = %r.name, %access, "resource access set");
        self.resource_view(&r.id, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_lifetimes_are_checked_never_wrapped() {
        assert_eq!(jwt_expiry(1_000, None), Ok(None));
        assert_eq!(jwt_expiry(1_000, Some(60)), Ok(Some(1_060)));
        assert_eq!(jwt_expiry(1_000, Some(MAX_JWT_LIFETIME_SECS)), Ok(Some(1_000 + MAX_JWT_LIFETIME_SECS)));
        for bad in [0, MAX_JWT_LIFETIME_SECS + 1, u64::MAX, u64::MAX - 500] {
            let e = jwt_expiry(1_000, Some(bad)).unwrap_err();
            assert_eq!(e.status, 400, "{bad}: {e}");
            assert!(e.message.starts_with("expires_in_secs: "), "{e}");
        }
        assert!(jwt_expiry(1_000, Some(0)).unwrap_err().message.contains("at least 1 second"));
        assert!(jwt_expiry(1_000, Some(u64::MAX)).unwrap_err().message.contains("more than 100 years"));
        // A clock near the end of u64 time: the sum would wrap into the past.
        let e = jwt_expiry(u64::MAX - 10, Some(60)).unwrap_err();
        assert!(e.message.contains("does not fit"), "{e}");
    }
}
