//! The relay's persistent state: customers, resources (with their stable ports and key
//! generations), agents, every registration JWT issued, and the membership of the relays
//! sharing the store (each relay's row, heartbeat and active/draining state).
//!
//! [`Store`] is the one interface the rest of the relay uses, with two engines:
//! [`SqliteStore`] (`sqlite.rs`), the embedded default for a single relay, and
//! [`PgStore`] (`postgres.rs`), for several relays sharing one PostgreSQL database. Both
//! run the same [`MIGRATIONS`]. The calls are synchronous and short (single-row reads and
//! writes), made on admin requests, enrollments and heartbeats, never per stream byte; a
//! caller on an async task blocks for them as it would on a short mutex.
//!
//! Revocation has two grains. A registration JWT as a whole is revoked (`revoked_at` on
//! its `registration_tokens` row) when the operator revokes it or when the one resource
//! it was issued for is rotated or deleted. A customer (or org-level) JWT enrolls agents
//! of many resources; rotating or deleting one of them revokes only that JWT's *use* for
//! that resource (`revoked_at` on the `token_uses` row): the JWT may have leaked with the
//! compromised host, so it must not enroll into that resource again, but the customer's
//! other resources keep re-enrolling (restarts, new replicas, certificate renewal) with it.

use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

mod postgres;
mod sqlite;

pub use self::postgres::{PgStore, redacted_url};
pub use self::sqlite::{SqliteStore, describe_db_error};

/// A customer of the platform operator (a tenant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub id: String,
    pub name: String,
    pub created_at: u64,
}

/// A private service reachable through one or more agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub id: String,
    /// `None` for an org-level resource.
    pub customer_id: Option<String>,
    pub name: String,
    /// The relay port platform jobs connect to; stable for the resource's life.
    pub port: u16,
    /// Key generation: bumped by a rotation; certificates of older generations are refused.
    pub generation: u64,
    pub created_at: u64,
    /// When an agent session last started or ended (seconds since the epoch).
    pub last_seen_at: Option<u64>,
}

/// A registration JWT the relay issued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub jti: String,
    pub customer_id: Option<String>,
    pub resource_id: Option<String>,
    pub issued_at: u64,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
}

/// An enrolled agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    pub id: String,
    pub resource_id: String,
    pub generation: u64,
    pub hostname: String,
    pub enrolled_at: u64,
    /// The registration JWT the agent enrolled with; `None` for agents enrolled before
    /// the relay recorded it.
    pub jti: Option<String>,
}

/// What rotating or deleting a resource revoked besides its agents' certificates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceRevocation {
    /// JWTs issued for the resource itself (`--resource-id`): revoked everywhere.
    pub revoked_resource_jwts: Vec<String>,
    /// Customer or org-level JWTs that had enrolled agents of the resource: they can no
    /// longer enroll agents for it, and stay valid for every other resource.
    pub blocked_for_resource_jwts: Vec<String>,
}

/// A registration JWT with how many agents (still on record) enrolled with it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenUsage {
    pub token: TokenRecord,
    pub agents: u64,
}

/// What [`Store::revoke_token`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenRevocation {
    /// No JWT with that id was ever issued by this relay.
    Unknown,
    /// Revoked now; the record carries the revocation time.
    Revoked(TokenRecord),
    /// It had been revoked before (at the record's `revoked_at`); nothing changed.
    AlreadyRevoked(TokenRecord),
}

/// Whether a relay takes new agent sessions and streams, or is draining for an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayState {
    Active,
    Draining,
}

impl RelayState {
    /// How the state is stored: "active" or "draining".
    pub fn as_str(self) -> &'static str {
        match self {
            RelayState::Active => "active",
            RelayState::Draining => "draining",
        }
    }

    /// The stored text back; anything unknown (a newer relay's state) reads as draining,
    /// so an older relay never sends work to a relay it does not understand.
    pub fn from_stored(s: &str) -> RelayState {
        match s {
            "active" => RelayState::Active,
            _ => RelayState::Draining,
        }
    }
}

/// One relay of the cluster, as it registered itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayRecord {
    /// e.g. "rly_…"
    pub id: String,
    /// The URL agents dial this relay on (its --public-url).
    pub agent_url: String,
    /// The host platform jobs use for resource ports on this relay.
    pub resource_host: String,
    /// http://host:port of its admin API.
    pub admin_url: String,
    pub version: String,
    pub started_at: u64,
    pub heartbeat_at: u64,
    pub state: RelayState,
}

/// An endpoint lease: one platform execution's own way in to one resource, a fresh port
/// from the lease range that admits only its holder (see docs/security.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// e.g. "lse_…"
    pub id: String,
    pub resource_id: String,
    /// The lease port (from `--lease-ports`), unique among leases not ended.
    pub port: u16,
    pub created_at: u64,
    pub expires_at: u64,
    /// Connections it admits in all (across every relay); `None`: no budget.
    pub max_connections: Option<u32>,
    /// Connections admitted so far (counted in the store, so across relays).
    pub connections_used: u64,
    /// The network its connections must come from (CIDR, e.g. 10.1.2.3/32).
    pub source: Option<String>,
    pub ended_at: Option<u64>,
    /// "expired", "deleted" or "spent".
    pub end_reason: Option<String>,
}

/// What [`Store::create_lease`] is asked for (the port is the store's choice).
#[derive(Debug, Clone, PartialEq)]
pub struct NewLease {
    pub id: String,
    pub resource_id: String,
    pub created_at: u64,
    pub expires_at: u64,
    pub max_connections: Option<u32>,
    pub source: Option<String>,
}

/// Why a connection on a lease port was refused by the store's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseRefusal {
    /// No such lease (deleted with its resource).
    Unknown,
    /// Ended (deleted, or spent and closed).
    Ended,
    /// Past its expiry.
    Expired,
    /// Its connection budget is used up.
    Spent,
}

impl LeaseRefusal {
    /// The `reason` label of `sluice_relay_lease_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            LeaseRefusal::Unknown | LeaseRefusal::Ended => "ended",
            LeaseRefusal::Expired => "expired",
            LeaseRefusal::Spent => "spent",
        }
    }
}

/// Why a lease that admits no more connections does so, without I/O: the one rule both
/// engines apply after their atomic increment found nothing to count.
pub(crate) fn lease_refusal(lease: Option<&Lease>, now: u64) -> LeaseRefusal {
    match lease {
        None => LeaseRefusal::Unknown,
        Some(l) if l.ended_at.is_some() => LeaseRefusal::Ended,
        Some(l) if l.expires_at <= now => LeaseRefusal::Expired,
        Some(_) => LeaseRefusal::Spent,
    }
}

/// An API token of the admin API, as stored: its SHA-256, never the token itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    /// e.g. "tok_…": names the token in lists, revocations and the audit trail.
    pub id: String,
    /// What the operator called it (`--name`).
    pub name: Option<String>,
    /// `admin`, `operator`, `platform` or `customer` ([`crate::admin::auth::Role`]).
    pub role: String,
    /// The customer a `customer` token is confined to.
    pub customer_id: Option<String>,
    /// SHA-256 of the token, hex; never sent out.
    #[serde(skip)]
    pub token_hash: String,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
}

/// One record of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// e.g. "aud_…"
    pub id: String,
    /// When it happened (admin action) or ended (stream), in ms since the epoch.
    pub at_ms: u64,
    /// The relay that recorded it.
    pub relay_id: String,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// What an audit record is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditEvent {
    Admin(AdminActionRecord),
    Stream(StreamRecord),
}

/// An admin API request that changed something or was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminActionRecord {
    /// The API token's id (`bootstrap` for the data directory's admin token; `-` when
    /// the request carried no valid token).
    pub token_id: String,
    /// The token's role (`-` without a valid token).
    pub role: String,
    /// The customer a `customer` token is confined to.
    pub customer_id: Option<String>,
    /// What was asked, e.g. `delete_resource` (or the route when no scope was checked).
    pub action: String,
    /// `METHOD /route/{param}` as routed.
    pub route: String,
    /// The id acted on (the path's id, or what the request created).
    pub target: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
    /// The error answered, when the status is not 2xx.
    pub error: Option<String>,
    /// The client's address.
    pub source: String,
}

/// A stream through a resource port, at its end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamRecord {
    pub resource_id: String,
    pub resource_name: String,
    pub agent_id: String,
    pub client_addr: String,
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    /// Bytes client → private service (the relay's counter).
    pub bytes_in: u64,
    /// Bytes private service → client.
    pub bytes_out: u64,
    /// `clean`, `aborted` or `cancelled`.
    pub end: String,
    /// The close reason in words (which side failed, and how).
    pub end_detail: String,
    /// The relay side's data path (`userspace`, `ktls_splice`).
    pub path: String,
    /// The endpoint lease the stream was admitted under, if any.
    pub lease_id: Option<String>,
}

impl AuditRecord {
    /// The kind stored in its own column: `admin` or `stream`.
    pub fn kind(&self) -> &'static str {
        match self.event {
            AuditEvent::Admin(_) => "admin",
            AuditEvent::Stream(_) => "stream",
        }
    }

    /// (resource id or admin target, resource name): the columns `--resource` matches.
    pub fn resource_columns(&self) -> (Option<String>, Option<String>) {
        match &self.event {
            AuditEvent::Admin(a) => (a.target.clone(), None),
            AuditEvent::Stream(s) => (Some(s.resource_id.clone()), Some(s.resource_name.clone())),
        }
    }
}

/// Which audit records to read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditQuery {
    pub since_ms: u64,
    /// A resource id or name (or an admin action's target id).
    pub resource: Option<String>,
    pub limit: u32,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Exhausted(String),
    /// A per-customer or per-JWT quota (relay/src/limits.rs) would be exceeded.
    #[error("{0}")]
    Quota(String),
    /// A SQLite call failed; [`SqliteStore`] turns it into [`StoreError::Unavailable`]
    /// before it leaves the store.
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    /// The database failed (SQLite: disk full, deleted, read-only, damaged; PostgreSQL:
    /// unreachable, authentication, missing database, …): the message names the file or
    /// the server (never a password), the cause and what to do.
    #[error("{0}")]
    Unavailable(String),
}

/// The relay's state, behind one small interface the embedded SQLite engine and the
/// PostgreSQL one both implement.
pub trait Store: Send + Sync {
    /// Whether the store answers (SQLite: and is still the file it opened). `Err` says
    /// what is wrong and what to do; the store watch turns it into `/readyz` 503.
    fn check(&self) -> Result<(), String>;
    /// Where the store is, for the log: the SQLite file, or PostgreSQL's host:port/db
    /// (never a password).
    fn location(&self) -> String;
    /// Called once when a new fault is seen: saves what can be saved and returns the
    /// sentences telling the operator about it and what to do next ("" for nothing).
    fn rescue(&self) -> String {
        String::new()
    }

    fn create_customer(&self, id: &str, name: &str, now: u64) -> Result<Customer, StoreError>;
    fn customers(&self) -> Result<Vec<Customer>, StoreError>;
    fn customer(&self, id: &str) -> Result<Option<Customer>, StoreError>;

    /// Creates a resource with the lowest free port of `ports`, unless its customer (or
    /// the org level, for `None`) already has `max_per_customer` resources
    /// ([`StoreError::Quota`]); the count and the insert are one transaction.
    fn create_resource(
        &self,
        id: &str,
        customer_id: Option<&str>,
        name: &str,
        ports: RangeInclusive<u16>,
        max_per_customer: u32,
        now: u64,
    ) -> Result<Resource, StoreError>;
    fn resource(&self, id: &str) -> Result<Option<Resource>, StoreError>;
    fn resource_by_name(&self, customer_id: Option<&str>, name: &str) -> Result<Option<Resource>, StoreError>;
    fn resources(&self) -> Result<Vec<Resource>, StoreError>;
    /// Bumps the key generation (so the agents' certificates of older generations are
    /// refused), revokes the JWTs issued for this resource, and revokes the use for this
    /// resource of every customer or org-level JWT that enrolled agents of it — those
    /// JWTs stay valid for other resources. Returns the new generation and what was revoked.
    fn rotate_resource(&self, id: &str, now: u64) -> Result<(u64, ResourceRevocation), StoreError>;
    /// Deletes the resource and its agents, and revokes JWTs as a rotation does. `None`
    /// if the resource did not exist.
    fn delete_resource(&self, id: &str, now: u64) -> Result<Option<ResourceRevocation>, StoreError>;
    fn touch_resource(&self, id: &str, now: u64) -> Result<(), StoreError>;

    fn record_token(&self, t: &TokenRecord) -> Result<(), StoreError>;
    fn token(&self, jti: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Every registration JWT (of one customer, when given), in the order issued, with the
    /// number of agents on record that enrolled with it.
    fn tokens(&self, customer_id: Option<&str>) -> Result<Vec<TokenUsage>, StoreError>;
    /// Revokes one registration JWT everywhere: it enrolls no more agents. Agents that
    /// enrolled with it keep their certificates.
    fn revoke_token(&self, jti: &str, now: u64) -> Result<TokenRevocation, StoreError>;
    /// The resources whose agents on record enrolled with `jti`.
    fn resources_enrolled_with(&self, jti: &str) -> Result<Vec<String>, StoreError>;
    /// Remembers that `jti` enrolled an agent of `resource_id`, so rotating or deleting
    /// that resource can revoke this JWT's use for it.
    fn mark_token_used(&self, jti: &str, resource_id: &str) -> Result<(), StoreError>;
    /// When `jti`'s use for `resource_id` was revoked (by rotating or deleting the
    /// resource), if it was.
    fn token_use_revoked_at(&self, jti: &str, resource_id: &str) -> Result<Option<u64>, StoreError>;

    fn add_agent(&self, a: &AgentRecord) -> Result<(), StoreError>;
    /// Records an enrolled agent unless its JWT already enrolled `max` agents since
    /// `since` ([`StoreError::Quota`] with that count); one transaction.
    fn add_agent_within(&self, a: &AgentRecord, since: u64, max: u32) -> Result<(), StoreError>;
    /// How many agents the JWT `jti` enrolled since `since`.
    fn enrollments_since(&self, jti: &str, since: u64) -> Result<u64, StoreError>;
    /// Whether any agent of the resource ever completed a control session.
    fn agents_ever_connected(&self, resource_id: &str) -> Result<bool, StoreError>;
    fn mark_agent_connected(&self, agent_id: &str, now: u64) -> Result<(), StoreError>;

    /// Inserts or replaces this relay's row (at start).
    fn register_relay(&self, r: &RelayRecord) -> Result<(), StoreError>;
    /// Sets heartbeat_at = now; returns the stored state (an operator may have set it to
    /// draining through another relay), or None when the row is gone (re-register).
    fn relay_heartbeat(&self, id: &str, now: u64) -> Result<Option<RelayState>, StoreError>;
    /// Sets the state; false when no relay has that id.
    fn set_relay_state(&self, id: &str, state: RelayState) -> Result<bool, StoreError>;
    /// Every registered relay, oldest first (by started_at, then id).
    fn relays(&self) -> Result<Vec<RelayRecord>, StoreError>;
    /// Deletes this relay's row (clean exit).
    fn remove_relay(&self, id: &str) -> Result<(), StoreError>;
    /// Deletes the rows whose heartbeat_at < before; returns their ids.
    fn forget_silent_relays(&self, before: u64) -> Result<Vec<String>, StoreError>;

    /// Creates a lease on the lowest port of `ports` that no lease not yet ended holds,
    /// unless the resource already has `max_active` such leases ([`StoreError::Quota`]).
    /// Ends the leases past their expiry first; one transaction (on PostgreSQL under an
    /// advisory lock, so two relays never hand out one port).
    fn create_lease(&self, new: &NewLease, ports: RangeInclusive<u16>, max_active: u32) -> Result<Lease, StoreError>;
    fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError>;
    /// Leases not ended, and those ended at or after `ended_since`, of one resource when
    /// given; newest first.
    fn leases(&self, resource_id: Option<&str>, ended_since: u64) -> Result<Vec<Lease>, StoreError>;
    /// Ends a lease not yet ended (`reason`: "deleted", "spent", "expired"); returns the
    /// lease as it now stands, `None` if there is no such lease.
    fn end_lease(&self, id: &str, reason: &str, now: u64) -> Result<Option<Lease>, StoreError>;
    /// Marks ended ("expired", at their expiry) the leases past `expires_at <= now`; returns them.
    fn expire_leases(&self, now: u64) -> Result<Vec<Lease>, StoreError>;
    /// Counts one connection on a lease, atomically (across relays): `Ok(lease)` with
    /// the count taken if the lease is neither ended, expired nor spent, else why not.
    fn use_lease(&self, id: &str, now: u64) -> Result<Result<Lease, LeaseRefusal>, StoreError>;
    /// Sets a resource's access: `true` leased-only (its fixed port refuses every
    /// connection), `false` open. False when no resource has that id.
    fn set_resource_leased_only(&self, id: &str, leased_only: bool) -> Result<bool, StoreError>;
    /// The ids of the leased-only resources.
    fn leased_only_resources(&self) -> Result<Vec<String>, StoreError>;

    /// Records a new API token (its hash; the token itself is never stored).
    fn create_api_token(&self, t: &ApiTokenRecord) -> Result<(), StoreError>;
    /// The API token whose SHA-256 (hex) is `token_hash`, revoked and expired ones too.
    fn api_token_by_hash(&self, token_hash: &str) -> Result<Option<ApiTokenRecord>, StoreError>;
    /// Every API token, oldest first.
    fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError>;
    /// Revokes an API token (keeping the first revocation time when it was revoked
    /// before); returns its record after, `None` when no token has that id.
    fn revoke_api_token(&self, id: &str, now: u64) -> Result<Option<ApiTokenRecord>, StoreError>;

    /// Appends one record to the audit trail (never updated afterwards).
    fn append_audit(&self, r: &AuditRecord) -> Result<(), StoreError>;
    /// Appends records to the audit trail in one transaction: all or none.
    fn append_audits(&self, rs: &[AuditRecord]) -> Result<(), StoreError>;
    /// The newest `limit` records at or after `since_ms` (of one resource, by id or
    /// name, when given), oldest first.
    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;
    /// Deletes the audit records older than `before_ms` (retention); returns how many.
    fn forget_audit_before(&self, before_ms: u64) -> Result<u64, StoreError>;
}

/// The schema, one migration per entry, shared by both engines: written in the SQL both
/// understand, with `INTEGER` for the u64 times and counters (64-bit in SQLite), which
/// [`for_postgres`] turns into `BIGINT`. Entry N brings a database from version N to N+1;
/// SQLite keeps the version in `PRAGMA user_version`, PostgreSQL in the table
/// `sluice_schema_version`. Never edit an entry that shipped: append a new one.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "CREATE TABLE customers (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE resources (
        id TEXT PRIMARY KEY,
        customer_id TEXT REFERENCES customers(id),
        scope TEXT NOT NULL,          -- customer id, or '' for org-level: makes (scope, name) unique
        name TEXT NOT NULL,
        port INTEGER NOT NULL UNIQUE,
        generation INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        last_seen_at INTEGER,
        UNIQUE (scope, name)
     );
     CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        resource_id TEXT NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
        generation INTEGER NOT NULL,
        hostname TEXT NOT NULL,
        enrolled_at INTEGER NOT NULL,
        connected_at INTEGER
     );
     CREATE TABLE registration_tokens (
        jti TEXT PRIMARY KEY,
        customer_id TEXT,
        resource_id TEXT,
        issued_at INTEGER NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER
     );
     CREATE TABLE token_uses (
        jti TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        PRIMARY KEY (jti, resource_id)
     );",
    // 2: a rotation or deletion revokes a JWT's use for one resource, not the whole JWT
    "ALTER TABLE token_uses ADD COLUMN revoked_at INTEGER;",
    // 3: which registration JWT each agent enrolled with (for listing and revocation)
    "ALTER TABLE agents ADD COLUMN jti TEXT;
     CREATE INDEX agents_jti ON agents (jti);",
    // 4: relay membership: every relay sharing this store registers itself and heartbeats
    "CREATE TABLE relays (
        id TEXT PRIMARY KEY,
        agent_url TEXT NOT NULL,
        resource_host TEXT NOT NULL,
        admin_url TEXT NOT NULL,
        version TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        heartbeat_at INTEGER NOT NULL,
        state TEXT NOT NULL          -- 'active' or 'draining'
     );",
    // 5: the order JWTs were issued in, within one second too (SQLite's rowid did that;
    // PostgreSQL has none): seq = 1 + the highest so far, set by the insert
    "ALTER TABLE registration_tokens ADD COLUMN seq INTEGER;
     UPDATE registration_tokens SET seq = (
        SELECT COUNT(*) FROM registration_tokens t2
        WHERE t2.issued_at < registration_tokens.issued_at
           OR (t2.issued_at = registration_tokens.issued_at AND t2.jti <= registration_tokens.jti)
     );",
    // endpoint leases: a fresh port per platform execution, and leased-only resources
    "ALTER TABLE resources ADD COLUMN access TEXT NOT NULL DEFAULT 'open';
     CREATE TABLE leases (
        id TEXT PRIMARY KEY,
        resource_id TEXT NOT NULL,
        port INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        max_connections INTEGER,
        connections_used INTEGER NOT NULL DEFAULT 0,
        source TEXT,
        ended_at INTEGER,
        end_reason TEXT
     );
     CREATE UNIQUE INDEX leases_active_port ON leases (port) WHERE ended_at IS NULL;
     CREATE INDEX leases_resource ON leases (resource_id);",
    // scoped API tokens (hashed) and the append-only audit trail (issue #13)
    "CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        name TEXT,
        role TEXT NOT NULL,
        customer_id TEXT,
        token_hash TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER
     );
     CREATE TABLE audit_log (
        id TEXT PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,          -- 'admin' or 'stream'
        resource TEXT,               -- stream: resource id; admin: the target id
        resource_name TEXT,
        record TEXT NOT NULL         -- the AuditRecord as JSON
     );
     CREATE INDEX audit_log_at ON audit_log (at_ms);",
];

/// A migration (or any schema text) in PostgreSQL's dialect: the one difference is the
/// integer width (SQLite's INTEGER is 64-bit, PostgreSQL's is 32-bit).
pub(crate) fn for_postgres(sql: &str) -> String {
    sql.replace("INTEGER", "BIGINT")
}

/// The lowest port of `ports` not in `used`, or why there is none.
pub(crate) fn lowest_free_port(
    ports: &RangeInclusive<u16>,
    used: &std::collections::HashSet<u16>,
) -> Result<u16, StoreError> {
    ports.clone().find(|p| !used.contains(p)).ok_or_else(|| {
        StoreError::Exhausted(format!(
            "every port of the resource port range {}-{} is taken: widen --resource-ports",
            ports.start(),
            ports.end()
        ))
    })
}

/// Refuses a resource when its customer (or the org level) already owns `owned` of `max`.
pub(crate) fn within_resource_quota(customer_id: Option<&str>, owned: u64, max: u32) -> Result<(), StoreError> {
    if owned < u64::from(max) {
        return Ok(());
    }
    let whose = customer_id.map_or("the org level".to_owned(), |c| format!("customer {c}"));
    Err(StoreError::Quota(format!(
        "{whose} already has {owned} resources, the relay's limit (--max-resources-per-customer {max}); delete \
         unused ones (`sluice resources delete`) or ask the relay's operator to raise the limit"
    )))
}

/// The refusal of an agent whose JWT already enrolled `recent` agents since `since`.
pub(crate) fn within_enrollment_quota(recent: u64, since: u64, max: u32) -> Result<(), StoreError> {
    if recent >= u64::from(max) {
        return Err(StoreError::Quota(format!("{recent} agents enrolled with this JWT since {since}")));
    }
    Ok(())
}

pub(crate) fn resource_name_taken(name: &str) -> StoreError {
    StoreError::Conflict(format!("a resource named {name:?} already exists"))
}

pub(crate) fn customer_name_taken(name: &str) -> StoreError {
    StoreError::Conflict(format!("a customer named {name:?} already exists"))
}

/// The SQL both engines run to list JWTs, in `?N` placeholders (PostgreSQL's `$N` are
/// made by [`numbered_placeholders`]).
pub(crate) const TOKEN_COLS: &str = "jti, customer_id, resource_id, issued_at, expires_at, revoked_at";
pub(crate) const RESOURCE_COLS: &str = "id, customer_id, name, port, generation, created_at, last_seen_at";
pub(crate) const RELAY_COLS: &str = "id, agent_url, resource_host, admin_url, version, started_at, heartbeat_at, state";

/// `?1` → `$1`: SQLite's numbered placeholders in PostgreSQL's form (the statements are
/// written once, in SQLite's; no statement holds a literal `?`).
pub(crate) fn numbered_placeholders(sql: &str) -> String {
    sql.replace('?', "$")
}

pub(crate) const INSERT_TOKEN: &str =
    "INSERT INTO registration_tokens (jti, customer_id, resource_id, issued_at, expires_at, revoked_at, seq)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, (SELECT COALESCE(MAX(seq), 0) + 1 FROM registration_tokens))";

pub(crate) const UPSERT_RELAY: &str =
    "INSERT INTO relays (id, agent_url, resource_host, admin_url, version, started_at, heartbeat_at, state)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
     ON CONFLICT (id) DO UPDATE SET agent_url = excluded.agent_url, resource_host = excluded.resource_host,
        admin_url = excluded.admin_url, version = excluded.version, started_at = excluded.started_at,
        heartbeat_at = excluded.heartbeat_at, state = excluded.state";

pub(crate) const LEASE_COLS: &str =
    "id, resource_id, port, created_at, expires_at, max_connections, connections_used, source, ended_at, end_reason";

/// The lowest lease port of `ports` not in `used`, or why there is none.
pub(crate) fn lowest_free_lease_port(
    ports: &RangeInclusive<u16>,
    used: &std::collections::HashSet<u16>,
) -> Result<u16, StoreError> {
    ports.clone().find(|p| !used.contains(p)).ok_or_else(|| {
        StoreError::Exhausted(format!(
            "every port of the lease port range {}-{} is held by a lease not yet ended: widen --lease-ports, or \
             delete leases that are no longer needed (`sluice leases delete ID`)",
            ports.start(),
            ports.end()
        ))
    })
}

/// Refuses one more lease for a resource that already has `active` of `max`.
pub(crate) fn within_lease_quota(resource_id: &str, active: u64, max: u32) -> Result<(), StoreError> {
    if active < u64::from(max) {
        return Ok(());
    }
    Err(StoreError::Quota(format!(
        "resource {resource_id} already has {active} active leases, the relay's limit (--max-leases-per-resource \
         {max}); delete leases no longer needed (`sluice leases delete ID`) or let them expire"
    )))
}

/// Counts one connection on lease `?1` at time `?2` if it admits one: not ended, not
/// expired, budget not spent. One statement, so two relays never both take the last one.
pub(crate) const USE_LEASE: &str = "UPDATE leases SET connections_used = connections_used + 1
     WHERE id = ?1 AND ended_at IS NULL AND expires_at > ?2
       AND (max_connections IS NULL OR connections_used < max_connections)";

pub(crate) const API_TOKEN_COLS: &str = "id, name, role, customer_id, token_hash, created_at, expires_at, revoked_at";

pub(crate) const INSERT_API_TOKEN: &str =
    "INSERT INTO api_tokens (id, name, role, customer_id, token_hash, created_at, expires_at, revoked_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

pub(crate) const INSERT_AUDIT: &str =
    "INSERT INTO audit_log (id, at_ms, kind, resource, resource_name, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// The newest ?3 records since ?1 (of resource ?2, when not NULL), newest first.
pub(crate) const SELECT_AUDIT: &str = "SELECT record FROM audit_log
     WHERE at_ms >= ?1 AND (?2 IS NULL OR resource = ?2 OR resource_name = ?2)
     ORDER BY at_ms DESC, id DESC LIMIT ?3";

/// An audit record as stored (JSON), and back.
pub(crate) fn audit_json(r: &AuditRecord) -> String {
    serde_json::to_string(r).expect("an audit record serializes")
}

pub(crate) fn audit_from_json(s: &str) -> Result<AuditRecord, StoreError> {
    serde_json::from_str(s)
        .map_err(|e| StoreError::Unavailable(format!("an audit record in the store is not valid: {e}")))
}
