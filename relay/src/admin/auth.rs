//! Who may do what on the admin API: roles, the actions they may take, and the caller
//! every request carries once its token is checked.
//!
//! One place decides. The middleware ([`crate::admin::api`]) turns the bearer token
//! into a [`Caller`] (the bootstrap admin token of the data directory, or an API token
//! looked up by its SHA-256 in the store on every request, so a revocation on one relay
//! holds on every relay at once) and puts it in the request's extensions. Each handler
//! then asks [`Caller::require`] for its [`Action`] — answered by [`allowed`], the scope
//! table — and, for a `customer` token, [`Caller::sees`] for every customer-owned thing
//! it touches or lists (others' are answered 404, as if they did not exist).
//!
//! | role       | may                                                                 |
//! |------------|---------------------------------------------------------------------|
//! | `admin`    | everything                                                          |
//! | `operator` | read everything; rotate resources, revoke registration JWTs, drain relays |
//! | `platform` | read resources and endpoints; create, list and delete endpoint leases |
//! | `customer` | its own customer's resources, registration JWTs, agents and streams |

use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::admin::ops::AdminError;

/// An API token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, API tokens included.
    Admin,
    /// Reads everything; rotates, revokes registration JWTs, drains relays.
    Operator,
    /// The platform's job runner: reads resources and endpoints, manages leases.
    Platform,
    /// One customer's resources, registration JWTs and agents (needs a customer id).
    Customer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Platform => "platform",
            Role::Customer => "customer",
        }
    }

    /// The stored text back; `None` for a role this relay does not know (a newer
    /// relay's): such a token is refused, never given more than it had.
    pub fn from_stored(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            "platform" => Role::Platform,
            "customer" => Role::Customer,
            _ => return None,
        })
    }

    /// What the role may do, in words (for 403 answers).
    pub fn may(self) -> &'static str {
        match self {
            Role::Admin => "everything",
            Role::Operator => {
                "read everything, rotate resources (registration-jwt --rotate), revoke registration JWTs and drain \
                 relays"
            }
            Role::Platform => "read resources and their endpoints, and create, list and delete endpoint leases",
            Role::Customer => "see and manage its own customer's resources, registration JWTs, agents and streams",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a caller can ask of the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    ListCustomers,
    CreateCustomer,
    /// A registration JWT for a customer, the org, or an existing resource.
    IssueJwt,
    /// A registration JWT with `rotate`: cuts off the resource's older credentials.
    RotateResource,
    ListJwts,
    RevokeJwt,
    ListResources,
    ReadResource,
    DeleteResource,
    /// `PATCH /v1/resources/{id}`: leased-only or open access.
    UpdateResource,
    ListStreams,
    ListAgents,
    ListRelays,
    DrainRelay,
    CreateApiToken,
    ListApiTokens,
    RevokeApiToken,
    ReadAudit,
    CreateLease,
    ListLeases,
    DeleteLease,
    /// `POST /v1/admin-token/rotate`: a new admin token, the old one refused everywhere.
    RotateAdminToken,
}

impl Action {
    /// The name in the audit trail, e.g. `delete_resource`.
    pub fn name(self) -> &'static str {
        match self {
            Action::ListCustomers => "list_customers",
            Action::CreateCustomer => "create_customer",
            Action::IssueJwt => "issue_registration_jwt",
            Action::RotateResource => "rotate_resource",
            Action::ListJwts => "list_registration_jwts",
            Action::RevokeJwt => "revoke_registration_jwt",
            Action::ListResources => "list_resources",
            Action::ReadResource => "read_resource",
            Action::DeleteResource => "delete_resource",
            Action::UpdateResource => "update_resource",
            Action::ListStreams => "list_streams",
            Action::ListAgents => "list_agents",
            Action::ListRelays => "list_relays",
            Action::DrainRelay => "drain_relay",
            Action::CreateApiToken => "create_api_token",
            Action::ListApiTokens => "list_api_tokens",
            Action::RevokeApiToken => "revoke_api_token",
            Action::ReadAudit => "read_audit",
            Action::CreateLease => "create_lease",
            Action::ListLeases => "list_leases",
            Action::DeleteLease => "delete_lease",
            Action::RotateAdminToken => "rotate_admin_token",
        }
    }
}

/// The scope table: whether `role` may take `action` (a `customer` token then only on
/// its own customer's things, see [`Caller::sees`]).
pub fn allowed(role: Role, action: Action) -> bool {
    use Action::*;
    match role {
        Role::Admin => true,
        Role::Operator => matches!(
            action,
            ListCustomers
                | RotateResource
                | ListJwts
                | RevokeJwt
                | ListResources
                | ReadResource
                | ListStreams
                | ListAgents
                | ListRelays
                | DrainRelay
                | ListApiTokens
                | ReadAudit
                | ListLeases
        ),
        Role::Platform => matches!(action, ListResources | ReadResource | CreateLease | ListLeases | DeleteLease),
        Role::Customer => matches!(
            action,
            ListCustomers
                | IssueJwt
                | RotateResource
                | ListJwts
                | RevokeJwt
                | ListResources
                | ReadResource
                | DeleteResource
                | UpdateResource
                | ListStreams
                | ListAgents
        ),
    }
}

/// The token id of the data directory's admin token.
pub const BOOTSTRAP_TOKEN_ID: &str = "bootstrap";

/// Who is calling: put in the request's extensions by the token check.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: String,
    pub role: Role,
    /// With [`Role::Customer`]: the one customer it sees.
    pub customer_id: Option<String>,
    /// The action the handler asked for (for the audit trail).
    asked: Arc<Mutex<Option<Action>>>,
}

impl Caller {
    pub fn new(token_id: impl Into<String>, role: Role, customer_id: Option<String>) -> Caller {
        Caller { token_id: token_id.into(), role, customer_id, asked: Arc::default() }
    }

    /// The bootstrap admin token's caller.
    pub fn bootstrap() -> Caller {
        Caller::new(BOOTSTRAP_TOKEN_ID, Role::Admin, None)
    }

    /// Ok when the caller's role may take `action`; else 403 naming the role and what it may do.
    pub fn require(&self, action: Action) -> Result<(), AdminError> {
        *self.asked.lock() = Some(action);
        if allowed(self.role, action) {
            return Ok(());
        }
        Err(AdminError {
            status: 403,
            message: format!(
                "API token {} has the role {}, which may not {}: a {} token may {}; ask an admin for a token with \
                 the role it takes (`sluice api-tokens create --role …`)",
                self.token_id,
                self.role,
                action.name().replace('_', " "),
                self.role,
                self.role.may()
            ),
        })
    }

    /// The action the handler asked for, if it asked.
    pub fn asked(&self) -> Option<Action> {
        *self.asked.lock()
    }

    /// Whether the caller sees something owned by `owner` (a customer id, `None` for
    /// org-level): every role but `customer` sees everything; a `customer` token only
    /// its own customer's.
    pub fn sees(&self, owner: Option<&str>) -> bool {
        match self.role {
            Role::Customer => owner.is_some() && owner == self.customer_id.as_deref(),
            _ => true,
        }
    }

    /// The customer a `customer` token is confined to (`None` for other roles).
    pub fn confined_to(&self) -> Option<&str> {
        match self.role {
            Role::Customer => self.customer_id.as_deref(),
            _ => None,
        }
    }
}

/// A new API token's secret: `sluice_tok_` and 32 random bytes in hex.
pub fn new_token_secret() -> String {
    let mut k = [0u8; 32];
    rand::rng().fill_bytes(&mut k);
    format!("sluice_tok_{}", hex::encode(k))
}

/// SHA-256 of a token, hex: what the store keeps and looks tokens up by.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Constant-time comparison, so a token (or its hash) cannot be guessed byte by byte
/// from timings.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_reads_rotates_drains_but_creates_nothing() {
        for a in [Action::ListResources, Action::RotateResource, Action::RevokeJwt, Action::DrainRelay] {
            assert!(allowed(Role::Operator, a), "{a:?}");
        }
        for a in [Action::CreateCustomer, Action::IssueJwt, Action::DeleteResource, Action::CreateApiToken] {
            assert!(!allowed(Role::Operator, a), "{a:?}");
        }
    }

    #[test]
    fn platform_reads_resources_and_manages_leases_only() {
        for a in [Action::ListResources, Action::ReadResource, Action::CreateLease, Action::DeleteLease] {
            assert!(allowed(Role::Platform, a), "{a:?}");
        }
        for a in [Action::ListJwts, Action::RotateResource, Action::ListAgents, Action::ReadAudit] {
            assert!(!allowed(Role::Platform, a), "{a:?}");
        }
    }

    #[test]
    fn a_customer_token_sees_only_its_customer() {
        let c = Caller::new("tok_1", Role::Customer, Some("cus_a".into()));
        assert!(c.sees(Some("cus_a")));
        assert!(!c.sees(Some("cus_b")));
        assert!(!c.sees(None), "org-level resources are not a customer's");
        assert!(Caller::bootstrap().sees(Some("cus_b")));
        let e = c.require(Action::CreateCustomer).unwrap_err();
        assert_eq!(e.status, 403);
        assert!(e.message.contains("role customer") && e.message.contains("may not create customer"), "{e}");
        assert_eq!(c.asked(), Some(Action::CreateCustomer));
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (new_token_secret(), new_token_secret());
        assert_ne!(a, b);
        assert_eq!(token_hash(&a).len(), 64);
        assert!(!token_hash(&a).contains(&a));
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert_eq!(Role::from_stored("superuser"), None);
    }
}
