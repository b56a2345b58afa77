//! API tokens of the admin API as operator actions on [`Relay`]: create (the token is
//! shown once, only its SHA-256 is stored), list, revoke, and the check every request's
//! bearer token goes through ([`Relay::authenticate`]), read from the store each time so
//! a revocation made on any relay of a cluster holds on all of them at once. Also the
//! audit trail's read side ([`Relay::audit_records`]).

use serde::{Deserialize, Serialize};
use sluice_proto::identity::{printable, unix_now};
use tracing::info;

use crate::admin::auth::{Caller, Role, new_token_secret, same, token_hash};
use crate::admin::ops::{AdminError, jwt_expiry};
use crate::data::agent_port::new_id;
use crate::relay::Relay;
use crate::state::store::{ApiTokenRecord, AuditQuery, AuditRecord};

/// The longest name an API token may carry.
const MAX_NAME: usize = 100;
/// The most audit records one request returns.
pub const MAX_AUDIT_LIMIT: u32 = 10_000;

/// A request for an API token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiTokenRequest {
    pub role: Role,
    /// With role `customer`: the customer it is confined to.
    #[serde(default)]
    pub customer_id: Option<String>,
    /// Lifetime in seconds; absent means no expiry.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
    /// What it is for, e.g. "ci-runner".
    #[serde(default)]
    pub name: Option<String>,
}

/// A created API token: the secret, shown this once, and its record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiTokenCreated {
    pub token: String,
    #[serde(flatten)]
    pub record: ApiTokenRecord,
}

impl Relay {
    /// Who a bearer token is: the bootstrap admin token, or a live API token. Unknown,
    /// revoked and expired tokens are 401 with what to do.
    pub fn authenticate(&self, given: &str) -> Result<Caller, AdminError> {
        let hash = token_hash(given);
        let stored = self.store.api_token_by_hash(&hash);
        if let Some(decided) = self.check_file_admin_token(given, &stored) {
            return decided;
        }
        let refused = |m: String| AdminError { status: 401, message: m };
        let Some(t) = stored?.filter(|t| same(t.token_hash.as_bytes(), hash.as_bytes())) else {
            return Err(refused(
                "the admin token is wrong (it is neither this relay's admin token nor an API token it knows): use \
                 the admin token the relay printed on first start (stored in its data directory as admin-token) or an \
                 API token an admin created (`sluice api-tokens create`)"
                    .into(),
            ));
        };
        if let Some(at) = t.revoked_at
            && crate::admin::admin_token::is_admin_token_row(&t)
        {
            return Err(refused(format!(
                "this admin token was replaced by `sluice admin-token rotate` (at {}): use the new one, which the \
                 relay that rotated it wrote into its data directory (admin-token); on another relay's host copy that \
                 file into its data directory, or pass --admin-token",
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(at))
            )));
        }
        if let Some(at) = t.revoked_at {
            return Err(refused(format!(
                "API token {} was revoked (at {at}): ask an admin for a new one (`sluice api-tokens create`)",
                t.id
            )));
        }
        if let Some(at) = t.expires_at
            && at <= unix_now()
        {
            return Err(refused(format!(
                "API token {} expired (at {at}): ask an admin for a new one (`sluice api-tokens create`)",
                t.id
            )));
        }
        let Some(role) = Role::from_stored(&t.role) else {
            return Err(refused(format!(
                "API token {} has the role {:?}, which this relay does not know (made by a newer relay?): upgrade \
                 this relay or use another token",
                t.id,
                printable(&t.role)
            )));
        };
        Ok(Caller::new(t.id, role, t.customer_id))
    }

    /// Creates an API token; the answer carries the token itself, never stored.
    pub fn create_api_token(&self, req: &ApiTokenRequest) -> Result<ApiTokenCreated, AdminError> {
        let now = unix_now();
        let expires_at = jwt_expiry(now, req.expires_in_secs)?;
        let customer_id = match (req.role, &req.customer_id) {
            (Role::Customer, Some(cid)) => {
                if self.store.customer(cid)?.is_none() {
                    return Err(AdminError::not_found(format!(
                        "no customer with id {cid}; see `sluice customers list`"
                    )));
                }
                Some(cid.clone())
            }
            (Role::Customer, None) => {
                return Err(AdminError::bad_request(
                    "a customer token needs --customer-id ID: the customer it may see and manage",
                ));
            }
            (role, Some(_)) => {
                return Err(AdminError::bad_request(format!(
                    "--customer-id is only for --role customer; a {role} token is not confined to a customer"
                )));
            }
            (_, None) => None,
        };
        let name = req.name.as_deref().map(str::trim).filter(|n| !n.is_empty());
        if let Some(n) = name
            && (n.chars().count() > MAX_NAME || n.chars().any(char::is_control))
        {
            return Err(AdminError::bad_request(format!(
                "the token name must be at most {MAX_NAME} characters, without control characters"
            )));
        }
        let token = new_token_secret();
        let record = ApiTokenRecord {
            id: new_id("tok"),
            name: name.map(str::to_owned),
            role: req.role.as_str().to_owned(),
            customer_id,
            token_hash: token_hash(&token),
            created_at: now,
            expires_at,
            revoked_at: None,
        };
        self.store.create_api_token(&record)?;
        info!(token_id = %record.id, role = %record.role, customer = record.customer_id.as_deref(), "API token created");
        Ok(ApiTokenCreated { token, record })
    }

    pub fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, AdminError> {
        Ok(self.store.api_tokens()?)
    }

    /// Revokes an API token on every relay sharing the store, at once.
    pub fn revoke_api_token(&self, id: &str) -> Result<ApiTokenRecord, AdminError> {
        let t = self
            .store
            .revoke_api_token(id, unix_now())?
            .ok_or_else(|| AdminError::not_found(format!("no API token with id {id}; see `sluice api-tokens list`")))?;
        info!(token_id = %t.id, "API token revoked");
        Ok(t)
    }

    /// Audit records since `since_ms` (of one resource), at most `limit` (capped).
    pub fn audit_records(
        &self,
        since_ms: u64,
        resource: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Vec<AuditRecord>, AdminError> {
        let limit = limit.unwrap_or(1000).clamp(1, MAX_AUDIT_LIMIT);
        Ok(self.store.audit(&AuditQuery { since_ms, resource: resource.map(str::to_owned), limit })?)
    }
}
