//! The relay's persistent state: customers, resources (with their stable ports and key
//! generations), agents, every registration JWT issued, and the membership of the relays
//! sharing the store (each relay's row, heartbeat and active/draining state).
//!
//! [`Store`] is the one interface the rest of the relay uses; [`SqliteStore`] is the
//! embedded default. The calls are synchronous and short (single-row reads and writes on
//! a local file), made on admin requests and enrollments, never per stream byte.
//!
//! Revocation has two grains. A registration JWT as a whole is revoked (`revoked_at` on
//! its `registration_tokens` row) when the operator revokes it or when the one resource
//! it was issued for is rotated or deleted. A customer (or org-level) JWT enrolls agents
//! of many resources; rotating or deleting one of them revokes only that JWT's *use* for
//! that resource (`revoked_at` on the `token_uses` row): the JWT may have leaked with the
//! compromised host, so it must not enroll into that resource again, but the customer's
//! other resources keep re-enrolling (restarts, new replicas, certificate renewal) with it.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

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
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    /// The database file failed (disk full, deleted, read-only, damaged): the message
    /// names the file, the cause and what to do ([`SqliteStore`] turns `Db` into this).
    #[error("{0}")]
    Unavailable(String),
}

/// The relay's state, behind one small interface so a PostgreSQL implementation can
/// stand beside the embedded SQLite one.
pub trait Store: Send + Sync {
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
}

const MIGRATIONS: &[&str] = &[
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
];

/// The embedded store: one SQLite file in the data directory.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// The database file, named in every error.
    path: PathBuf,
    /// (device, inode) of the file when it was opened: [`SqliteStore::check_file`]
    /// notices the file deleted or replaced under the running relay.
    file_id: (u64, u64),
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    /// Errors name the file and what to do.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let fail = |e: rusqlite::Error| StoreError::Unavailable(describe_db_error(path, &e));
        let conn = Connection::open(path).map_err(fail)?;
        let setup = || -> rusqlite::Result<()> {
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.busy_timeout(std::time::Duration::from_secs(5))
        };
        setup().map_err(fail)?;
        let file_id = file_id(path).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let store = SqliteStore { conn: Mutex::new(conn), path: path.to_owned(), file_id };
        store.migrate().map_err(|e| store.named(e))?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|e| self.named(e))
    }

    /// A database failure as the operator reads it: the file, the cause, what to do.
    fn named(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Db(e) => {
                crate::metrics::store_error();
                StoreError::Unavailable(describe_db_error(&self.path, &e))
            }
            e => e,
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the database is still the file it was: present at its path (not deleted,
    /// not replaced by another file) and answering a query. `Err` says what is wrong
    /// and what to do.
    pub fn check_file(&self) -> Result<(), String> {
        let path = self.path.display();
        match file_id(&self.path) {
            Ok(id) if id == self.file_id => {}
            Ok(_) => {
                return Err(format!(
                    "the database file {path} was replaced by another file while the relay runs: the relay still \
                     uses the file it opened, and what it writes from now on is lost when it stops"
                ));
            }
            Err(_) if !self.path.exists() => {
                return Err(format!(
                    "the database file {path} was deleted while the relay runs: the relay still uses the open \
                     (deleted) file, and every customer, resource and agent is lost when it stops"
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
        self.with(|c| Ok(c.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))?))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Writes a consistent copy of the open database to `to` (SQLite's `VACUUM INTO`):
    /// what can be saved of a database whose file was deleted under the relay.
    pub fn save_copy(&self, to: &Path) -> Result<(), StoreError> {
        let to = to.to_str().ok_or_else(|| StoreError::Unavailable(format!("{} is not UTF-8", to.display())))?;
        self.with(|c| Ok(c.execute("VACUUM INTO ?1", [to]).map(|_| ())?))
    }
}

/// (device, inode) of the file at `path`.
fn file_id(path: &Path) -> Result<(u64, u64), anyhow::Error> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| crate::state::data_dir::io_failure("read", path, &e))
}

/// What an operator reads about a failed database call: "cannot write /x/sluice.db:
/// database or disk is full — free space on the volume holding /x". Classified by
/// SQLite's error code, never by its text.
pub fn describe_db_error(path: &Path, e: &rusqlite::Error) -> String {
    use rusqlite::ErrorCode as C;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).display();
    let file = path.display();
    let Some(code) = e.sqlite_error() else {
        return format!("the database {file} failed: {e}");
    };
    // SQLITE_READONLY_DBMOVED: the file was renamed or deleted under the open connection.
    const READONLY_DBMOVED: std::os::raw::c_int = 8 | (4 << 8);
    let (action, what_to_do) = match code.code {
        _ if code.extended_code == READONLY_DBMOVED => (
            "write",
            "the database file was moved or deleted while the relay ran; see the relay's log and docs/operations.md \
             (\"The database file\")"
                .to_owned(),
        ),
        C::DiskFull => ("write", format!("free space on the volume holding {dir} (`df -h {dir}`)")),
        C::ReadOnly => (
            "write",
            format!("the relay's user needs write access to {file} and {dir}, on a volume mounted read-write"),
        ),
        C::CannotOpen => ("open", format!("check that {dir} exists and that the relay's user may write it")),
        C::PermissionDenied => ("open", format!("the relay's user needs read and write access to {file} and {dir}")),
        C::DatabaseCorrupt | C::NotADatabase => {
            ("read", format!("{file} is damaged or not a Sluice database: restore it from a backup"))
        }
        C::DatabaseBusy | C::DatabaseLocked => (
            "use",
            "another process holds the database: is a second relay (or a sqlite3 shell) using it? Stop it".to_owned(),
        ),
        C::SystemIoFailure => {
            ("use", format!("an I/O error: check free space on the volume holding {dir} and `dmesg`"))
        }
        _ => ("use", "see the relay's log".to_owned()),
    };
    format!("cannot {action} {file}: {e} — {what_to_do}")
}

const RESOURCE_COLS: &str = "id, customer_id, name, port, generation, created_at, last_seen_at";

fn resource_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Resource> {
    Ok(Resource {
        id: r.get(0)?,
        customer_id: r.get(1)?,
        name: r.get(2)?,
        port: r.get(3)?,
        generation: r.get::<_, i64>(4)? as u64,
        created_at: r.get::<_, i64>(5)? as u64,
        last_seen_at: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
    })
}

const TOKEN_COLS: &str = "jti, customer_id, resource_id, issued_at, expires_at, revoked_at";

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        jti: r.get(0)?,
        customer_id: r.get(1)?,
        resource_id: r.get(2)?,
        issued_at: r.get::<_, i64>(3)? as u64,
        expires_at: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
        revoked_at: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
    })
}

fn customer_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Customer> {
    Ok(Customer { id: r.get(0)?, name: r.get(1)?, created_at: r.get::<_, i64>(2)? as u64 })
}

const RELAY_COLS: &str = "id, agent_url, resource_host, admin_url, version, started_at, heartbeat_at, state";

fn relay_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RelayRecord> {
    Ok(RelayRecord {
        id: r.get(0)?,
        agent_url: r.get(1)?,
        resource_host: r.get(2)?,
        admin_url: r.get(3)?,
        version: r.get(4)?,
        started_at: r.get::<_, i64>(5)? as u64,
        heartbeat_at: r.get::<_, i64>(6)? as u64,
        state: RelayState::from_stored(&r.get::<_, String>(7)?),
    })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

impl Store for SqliteStore {
    fn create_customer(&self, id: &str, name: &str, now: u64) -> Result<Customer, StoreError> {
        self.with(|c| {
            match c.execute(
                "INSERT INTO customers (id, name, created_at) VALUES (?1, ?2, ?3)",
                params![id, name, now as i64],
            ) {
                Ok(_) => Ok(Customer { id: id.into(), name: name.into(), created_at: now }),
                Err(e) if is_unique_violation(&e) => {
                    Err(StoreError::Conflict(format!("a customer named {name:?} already exists")))
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    fn customers(&self) -> Result<Vec<Customer>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT id, name, created_at FROM customers ORDER BY created_at, name")?;
            let rows = st.query_map([], customer_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn customer(&self, id: &str) -> Result<Option<Customer>, StoreError> {
        self.with(|c| {
            Ok(c.query_row("SELECT id, name, created_at FROM customers WHERE id = ?1", [id], customer_row)
                .optional()?)
        })
    }

    fn create_resource(
        &self,
        id: &str,
        customer_id: Option<&str>,
        name: &str,
        ports: RangeInclusive<u16>,
        max_per_customer: u32,
        now: u64,
    ) -> Result<Resource, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let owned: i64 =
                tx.query_row("SELECT COUNT(*) FROM resources WHERE scope = ?1", [customer_id.unwrap_or("")], |r| {
                    r.get(0)
                })?;
            let owned = owned as u64;
            if owned >= u64::from(max_per_customer) {
                let whose = customer_id.map_or("the org level".to_owned(), |c| format!("customer {c}"));
                return Err(StoreError::Quota(format!(
                    "{whose} already has {owned} resources, the relay's limit (--max-resources-per-customer \
                     {max_per_customer}); delete unused ones (`sluice resources delete`) or ask the relay's operator \
                     to raise the limit"
                )));
            }
            let used: std::collections::HashSet<u16> = {
                let mut st = tx.prepare("SELECT port FROM resources")?;
                st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
            };
            let port = ports.clone().find(|p| !used.contains(p)).ok_or_else(|| {
                StoreError::Exhausted(format!(
                    "every port of the resource port range {}-{} is taken: widen --resource-ports",
                    ports.start(),
                    ports.end()
                ))
            })?;
            let res = tx.execute(
                "INSERT INTO resources (id, customer_id, scope, name, port, generation, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6)",
                params![id, customer_id, customer_id.unwrap_or(""), name, port, now as i64],
            );
            match res {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    return Err(StoreError::Conflict(format!("a resource named {name:?} already exists")));
                }
                Err(e) => return Err(e.into()),
            }
            tx.commit()?;
            Ok(Resource {
                id: id.into(),
                customer_id: customer_id.map(Into::into),
                name: name.into(),
                port,
                generation: 1,
                created_at: now,
                last_seen_at: None,
            })
        })
    }

    fn resource(&self, id: &str) -> Result<Option<Resource>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(&format!("SELECT {RESOURCE_COLS} FROM resources WHERE id = ?1"), [id], resource_row)
                .optional()?)
        })
    }

    fn resource_by_name(&self, customer_id: Option<&str>, name: &str) -> Result<Option<Resource>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {RESOURCE_COLS} FROM resources WHERE scope = ?1 AND name = ?2"),
                params![customer_id.unwrap_or(""), name],
                resource_row,
            )
            .optional()?)
        })
    }

    fn resources(&self) -> Result<Vec<Resource>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!("SELECT {RESOURCE_COLS} FROM resources ORDER BY created_at, name"))?;
            let rows = st.query_map([], resource_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn rotate_resource(&self, id: &str, now: u64) -> Result<(u64, ResourceRevocation), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("UPDATE resources SET generation = generation + 1 WHERE id = ?1", [id])?;
            let generation: i64 = tx.query_row("SELECT generation FROM resources WHERE id = ?1", [id], |r| r.get(0))?;
            let revoked = revoke_credentials_of(&tx, id, now)?;
            tx.commit()?;
            Ok((generation as u64, revoked))
        })
    }

    fn delete_resource(&self, id: &str, now: u64) -> Result<Option<ResourceRevocation>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let revoked = revoke_credentials_of(&tx, id, now)?;
            tx.execute("DELETE FROM agents WHERE resource_id = ?1", [id])?;
            let n = tx.execute("DELETE FROM resources WHERE id = ?1", [id])?;
            if n == 0 {
                // Nothing existed: leave no trace of a revocation.
                return Ok(None);
            }
            tx.commit()?;
            Ok(Some(revoked))
        })
    }

    fn touch_resource(&self, id: &str, now: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("UPDATE resources SET last_seen_at = ?2 WHERE id = ?1", params![id, now as i64])?;
            Ok(())
        })
    }

    fn record_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO registration_tokens (jti, customer_id, resource_id, issued_at, expires_at, revoked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    t.jti,
                    t.customer_id,
                    t.resource_id,
                    t.issued_at as i64,
                    t.expires_at.map(|v| v as i64),
                    t.revoked_at.map(|v| v as i64)
                ],
            )?;
            Ok(())
        })
    }

    fn token(&self, jti: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(&format!("SELECT {TOKEN_COLS} FROM registration_tokens WHERE jti = ?1"), [jti], token_row)
                .optional()?)
        })
    }

    fn tokens(&self, customer_id: Option<&str>) -> Result<Vec<TokenUsage>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {TOKEN_COLS}, (SELECT COUNT(*) FROM agents a WHERE a.jti = t.jti)
                 FROM registration_tokens t
                 WHERE ?1 IS NULL OR t.customer_id = ?1
                 ORDER BY t.issued_at, t.rowid"
            ))?;
            let rows = st
                .query_map([customer_id], |r| {
                    Ok(TokenUsage { token: token_row(r)?, agents: r.get::<_, i64>(6)? as u64 })
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn revoke_token(&self, jti: &str, now: u64) -> Result<TokenRevocation, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let found = tx
                .query_row(&format!("SELECT {TOKEN_COLS} FROM registration_tokens WHERE jti = ?1"), [jti], token_row)
                .optional()?;
            let outcome = match found {
                None => TokenRevocation::Unknown,
                Some(t) if t.revoked_at.is_some() => TokenRevocation::AlreadyRevoked(t),
                Some(mut t) => {
                    tx.execute(
                        "UPDATE registration_tokens SET revoked_at = ?2 WHERE jti = ?1",
                        params![jti, now as i64],
                    )?;
                    t.revoked_at = Some(now);
                    TokenRevocation::Revoked(t)
                }
            };
            tx.commit()?;
            Ok(outcome)
        })
    }

    fn resources_enrolled_with(&self, jti: &str) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT DISTINCT resource_id FROM agents WHERE jti = ?1 ORDER BY resource_id")?;
            let rows = st.query_map([jti], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn mark_token_used(&self, jti: &str, resource_id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO token_uses (jti, resource_id) VALUES (?1, ?2)",
                params![jti, resource_id],
            )?;
            Ok(())
        })
    }

    fn token_use_revoked_at(&self, jti: &str, resource_id: &str) -> Result<Option<u64>, StoreError> {
        self.with(|c| {
            let at: Option<Option<i64>> = c
                .query_row(
                    "SELECT revoked_at FROM token_uses WHERE jti = ?1 AND resource_id = ?2",
                    params![jti, resource_id],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(at.flatten().map(|v| v as u64))
        })
    }

    fn add_agent(&self, a: &AgentRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO agents (id, resource_id, generation, hostname, enrolled_at, jti)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![a.id, a.resource_id, a.generation as i64, a.hostname, a.enrolled_at as i64, a.jti],
            )?;
            Ok(())
        })
    }

    fn add_agent_within(&self, a: &AgentRecord, since: u64, max: u32) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let recent: i64 = tx.query_row(
                "SELECT COUNT(*) FROM agents WHERE jti = ?1 AND enrolled_at >= ?2",
                params![a.jti, since as i64],
                |r| r.get(0),
            )?;
            let recent = recent as u64;
            if recent >= u64::from(max) {
                return Err(StoreError::Quota(format!("{recent} agents enrolled with this JWT since {since}")));
            }
            tx.execute(
                "INSERT INTO agents (id, resource_id, generation, hostname, enrolled_at, jti)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![a.id, a.resource_id, a.generation as i64, a.hostname, a.enrolled_at as i64, a.jti],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn enrollments_since(&self, jti: &str, since: u64) -> Result<u64, StoreError> {
        self.with(|c| {
            let n: i64 = c.query_row(
                "SELECT COUNT(*) FROM agents WHERE jti = ?1 AND enrolled_at >= ?2",
                params![jti, since as i64],
                |r| r.get(0),
            )?;
            Ok(n as u64)
        })
    }

    fn agents_ever_connected(&self, resource_id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT EXISTS (SELECT 1 FROM agents WHERE resource_id = ?1 AND connected_at IS NOT NULL)",
                [resource_id],
                |r| r.get(0),
            )?)
        })
    }

    fn mark_agent_connected(&self, agent_id: &str, now: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("UPDATE agents SET connected_at = ?2 WHERE id = ?1", params![agent_id, now as i64])?;
            Ok(())
        })
    }

    fn register_relay(&self, r: &RelayRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                &format!("INSERT OR REPLACE INTO relays ({RELAY_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                params![
                    r.id,
                    r.agent_url,
                    r.resource_host,
                    r.admin_url,
                    r.version,
                    r.started_at as i64,
                    r.heartbeat_at as i64,
                    r.state.as_str()
                ],
            )?;
            Ok(())
        })
    }

    fn relay_heartbeat(&self, id: &str, now: u64) -> Result<Option<RelayState>, StoreError> {
        self.with(|c| {
            let state: Option<String> = c
                .query_row(
                    "UPDATE relays SET heartbeat_at = ?2 WHERE id = ?1 RETURNING state",
                    params![id, now as i64],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(state.as_deref().map(RelayState::from_stored))
        })
    }

    fn set_relay_state(&self, id: &str, state: RelayState) -> Result<bool, StoreError> {
        self.with(|c| Ok(c.execute("UPDATE relays SET state = ?2 WHERE id = ?1", params![id, state.as_str()])? > 0))
    }

    fn relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!("SELECT {RELAY_COLS} FROM relays ORDER BY started_at, id"))?;
            let rows = st.query_map([], relay_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn remove_relay(&self, id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("DELETE FROM relays WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    fn forget_silent_relays(&self, before: u64) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("DELETE FROM relays WHERE heartbeat_at < ?1 RETURNING id")?;
            let mut ids: Vec<String> = st.query_map([before as i64], |r| r.get(0))?.collect::<Result<_, _>>()?;
            ids.sort();
            Ok(ids)
        })
    }
}

/// Revokes the JWTs issued for `resource_id`, and the use for `resource_id` of every
/// other JWT that enrolled agents of it (those stay valid for other resources).
fn revoke_credentials_of(
    tx: &rusqlite::Transaction<'_>,
    resource_id: &str,
    now: u64,
) -> Result<ResourceRevocation, StoreError> {
    let jtis = |sql: &str| -> Result<Vec<String>, StoreError> {
        let mut st = tx.prepare(sql)?;
        let rows = st.query_map([resource_id], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(rows)
    };
    let revoked_resource_jwts = jtis(
        "SELECT jti FROM registration_tokens WHERE resource_id = ?1 AND revoked_at IS NULL ORDER BY issued_at, jti",
    )?;
    let blocked_for_resource_jwts = jtis(
        "SELECT u.jti FROM token_uses u JOIN registration_tokens t ON t.jti = u.jti
         WHERE u.resource_id = ?1 AND u.revoked_at IS NULL
           AND t.resource_id IS NULL AND t.revoked_at IS NULL
         ORDER BY t.issued_at, u.jti",
    )?;
    tx.execute(
        "UPDATE registration_tokens SET revoked_at = ?2 WHERE resource_id = ?1 AND revoked_at IS NULL",
        params![resource_id, now as i64],
    )?;
    tx.execute(
        "UPDATE token_uses SET revoked_at = ?2 WHERE resource_id = ?1 AND revoked_at IS NULL",
        params![resource_id, now as i64],
    )?;
    Ok(ResourceRevocation { revoked_resource_jwts, blocked_for_resource_jwts })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        (dir, s)
    }

    #[test]
    fn ports_are_allocated_lowest_free_and_survive_reopen() {
        let (dir, s) = store();
        s.create_customer("c1", "acme", 1).unwrap();
        let a = s.create_resource("r1", Some("c1"), "db", 100..=102, u32::MAX, 1).unwrap();
        let b = s.create_resource("r2", None, "db", 100..=102, u32::MAX, 1).unwrap();
        assert_eq!((a.port, b.port), (100, 101));
        assert!(s.delete_resource("r1", 2).unwrap().is_some());
        let c = s.create_resource("r3", Some("c1"), "sftp", 100..=102, u32::MAX, 3).unwrap();
        assert_eq!(c.port, 100, "a deleted resource's port is reused");
        s.create_resource("r4", Some("c1"), "x", 100..=102, u32::MAX, 3).unwrap();
        let err = s.create_resource("r5", Some("c1"), "y", 100..=102, u32::MAX, 3).unwrap_err();
        assert!(matches!(err, StoreError::Exhausted(_)));
        drop(s);
        let s = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        assert_eq!(s.resource("r2").unwrap().unwrap().port, 101);
    }

    #[test]
    fn a_deleted_or_replaced_database_file_is_noticed_and_can_be_saved() {
        let (dir, s) = store();
        s.create_customer("c1", "acme", 1).unwrap();
        assert_eq!(s.check_file(), Ok(()));
        let path = dir.path().join("s.db");
        std::fs::remove_file(&path).unwrap();
        let err = s.check_file().unwrap_err();
        assert!(err.contains(&format!("{} was deleted", path.display())), "{err}");
        // What can be saved is saved: the copy holds the customer.
        let copy = dir.path().join("s.db.recovered");
        s.save_copy(&copy).unwrap();
        assert_eq!(SqliteStore::open(&copy).unwrap().customers().unwrap().len(), 1);
        // Another file at the path is not the database the relay has open.
        std::fs::write(&path, b"").unwrap();
        let err = s.check_file().unwrap_err();
        assert!(err.contains("was replaced by another file"), "{err}");
    }

    #[test]
    fn database_errors_name_the_file_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir").join("s.db");
        let err = SqliteStore::open(&missing).err().unwrap().to_string();
        assert!(err.starts_with(&format!("cannot open {}: ", missing.display())), "{err}");
        assert!(err.contains("check that") && err.contains("no-such-dir exists"), "{err}");
        let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
        let m = describe_db_error(Path::new("/data/sluice.db"), &full);
        assert!(m.starts_with("cannot write /data/sluice.db: "), "{m}");
        assert!(m.contains("free space on the volume holding /data"), "{m}");
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
        let err = SqliteStore::open(&garbage).err().unwrap().to_string();
        assert!(err.contains("restore it from a backup"), "{err}");
    }

    #[test]
    fn names_are_unique_per_customer() {
        let (_d, s) = store();
        s.create_customer("c1", "acme", 1).unwrap();
        s.create_customer("c2", "globex", 1).unwrap();
        assert!(matches!(s.create_customer("c3", "acme", 1), Err(StoreError::Conflict(_))));
        s.create_resource("r1", Some("c1"), "db", 1..=9, u32::MAX, 1).unwrap();
        s.create_resource("r2", Some("c2"), "db", 1..=9, u32::MAX, 1).unwrap();
        assert!(matches!(s.create_resource("r3", Some("c1"), "db", 1..=9, u32::MAX, 1), Err(StoreError::Conflict(_))));
        assert_eq!(s.resource_by_name(Some("c2"), "db").unwrap().unwrap().id, "r2");
        assert_eq!(s.resource_by_name(None, "db").unwrap(), None);
    }

    fn tok(jti: &str, cid: Option<&str>, rid: Option<&str>) -> TokenRecord {
        TokenRecord {
            jti: jti.into(),
            customer_id: cid.map(Into::into),
            resource_id: rid.map(Into::into),
            issued_at: 1,
            expires_at: None,
            revoked_at: None,
        }
    }

    fn agent(id: &str, rid: &str, jti: &str) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            resource_id: rid.into(),
            generation: 1,
            hostname: "h".into(),
            enrolled_at: 1,
            jti: Some(jti.into()),
        }
    }

    #[test]
    fn rotation_revokes_the_resources_jwts_and_blocks_customer_jwts_for_it_only() {
        let (_d, s) = store();
        s.create_customer("c1", "acme", 1).unwrap();
        s.create_resource("r1", Some("c1"), "a", 1..=9, u32::MAX, 1).unwrap();
        s.create_resource("r2", Some("c1"), "b", 1..=9, u32::MAX, 1).unwrap();
        s.record_token(&tok("for-r1", Some("c1"), Some("r1"))).unwrap();
        s.record_token(&tok("for-r2", Some("c1"), Some("r2"))).unwrap();
        s.record_token(&tok("customer", Some("c1"), None)).unwrap();
        s.record_token(&tok("unrelated", Some("c1"), None)).unwrap();
        // One customer JWT enrolled agents of both resources.
        s.mark_token_used("customer", "r1").unwrap();
        s.mark_token_used("customer", "r2").unwrap();
        s.mark_token_used("for-r1", "r1").unwrap();

        let (generation, revoked) = s.rotate_resource("r1", 5).unwrap();
        assert_eq!(generation, 2);
        assert_eq!(
            revoked,
            ResourceRevocation {
                revoked_resource_jwts: vec!["for-r1".into()],
                blocked_for_resource_jwts: vec!["customer".into()],
            }
        );
        assert_eq!(s.token("for-r1").unwrap().unwrap().revoked_at, Some(5));
        assert_eq!(s.token("for-r2").unwrap().unwrap().revoked_at, None, "other resources' JWTs stay valid");
        assert_eq!(s.token("customer").unwrap().unwrap().revoked_at, None, "the customer JWT stays valid");
        assert_eq!(s.token("unrelated").unwrap().unwrap().revoked_at, None);
        assert_eq!(s.token_use_revoked_at("customer", "r1").unwrap(), Some(5), "but it can no longer enroll into r1");
        assert_eq!(s.token_use_revoked_at("customer", "r2").unwrap(), None, "and still can into r2");
        assert_eq!(s.token_use_revoked_at("unrelated", "r1").unwrap(), None, "a JWT that never enrolled r1");

        // A second rotation reports only what it revoked itself.
        assert_eq!(s.rotate_resource("r1", 6).unwrap(), (3, ResourceRevocation::default()));
        assert_eq!(s.token_use_revoked_at("customer", "r1").unwrap(), Some(5));
    }

    #[test]
    fn deletion_revokes_like_rotation_and_unknown_ids_change_nothing() {
        let (_d, s) = store();
        s.create_customer("c1", "acme", 1).unwrap();
        s.create_resource("r1", Some("c1"), "a", 1..=9, u32::MAX, 1).unwrap();
        s.record_token(&tok("for-r1", Some("c1"), Some("r1"))).unwrap();
        s.record_token(&tok("customer", Some("c1"), None)).unwrap();
        s.mark_token_used("customer", "r1").unwrap();
        s.add_agent(&agent("a1", "r1", "customer")).unwrap();
        assert_eq!(s.delete_resource("nope", 2).unwrap(), None);
        assert_eq!(s.token_use_revoked_at("customer", "r1").unwrap(), None);
        let revoked = s.delete_resource("r1", 3).unwrap().unwrap();
        assert_eq!(revoked.revoked_resource_jwts, ["for-r1"]);
        assert_eq!(revoked.blocked_for_resource_jwts, ["customer"]);
        assert_eq!(s.token("customer").unwrap().unwrap().revoked_at, None);
        assert_eq!(s.token_use_revoked_at("customer", "r1").unwrap(), Some(3));
        assert!(s.resources_enrolled_with("customer").unwrap().is_empty(), "the agents went with the resource");
    }

    #[test]
    fn tokens_are_listed_with_agent_counts_and_revoked_one_by_one() {
        let (_d, s) = store();
        s.create_customer("c1", "acme", 1).unwrap();
        s.create_customer("c2", "globex", 1).unwrap();
        s.create_resource("r1", Some("c1"), "a", 1..=9, u32::MAX, 1).unwrap();
        s.record_token(&tok("t1", Some("c1"), None)).unwrap();
        s.record_token(&tok("t2", Some("c2"), None)).unwrap();
        s.record_token(&tok("t3", None, None)).unwrap();
        s.add_agent(&agent("a1", "r1", "t1")).unwrap();
        s.add_agent(&agent("a2", "r1", "t1")).unwrap();

        let all = s.tokens(None).unwrap();
        let counts: Vec<(&str, u64)> = all.iter().map(|u| (u.token.jti.as_str(), u.agents)).collect();
        assert_eq!(counts, [("t1", 2), ("t2", 0), ("t3", 0)]);
        let of_c2 = s.tokens(Some("c2")).unwrap();
        assert_eq!(of_c2.iter().map(|u| u.token.jti.as_str()).collect::<Vec<_>>(), ["t2"]);
        assert_eq!(s.resources_enrolled_with("t1").unwrap(), ["r1"]);

        assert!(matches!(s.revoke_token("t1", 7).unwrap(), TokenRevocation::Revoked(t) if t.revoked_at == Some(7)));
        assert!(
            matches!(s.revoke_token("t1", 8).unwrap(), TokenRevocation::AlreadyRevoked(t) if t.revoked_at == Some(7))
        );
        assert_eq!(s.revoke_token("nope", 8).unwrap(), TokenRevocation::Unknown);
        assert_eq!(s.token("t2").unwrap().unwrap().revoked_at, None);
    }

    #[test]
    fn quotas_are_counted_in_the_same_transaction_as_the_insert() {
        let (_d, s) = store();
        s.create_customer("c1", "acme", 1).unwrap();
        s.create_customer("c2", "globex", 1).unwrap();
        s.create_resource("r1", Some("c1"), "a", 1..=9, 2, 1).unwrap();
        s.create_resource("r2", Some("c1"), "b", 1..=9, 2, 1).unwrap();
        let over = s.create_resource("r3", Some("c1"), "c", 1..=9, 2, 1).unwrap_err();
        assert!(matches!(&over, StoreError::Quota(m) if m.contains("customer c1 already has 2 resources")), "{over}");
        s.create_resource("r3", Some("c2"), "c", 1..=9, 2, 1).expect("another customer's quota is its own");
        s.create_resource("r4", None, "c", 1..=9, 1, 1).expect("the org level counts apart");

        let mut a = agent("a1", "r1", "t1");
        a.enrolled_at = 100;
        s.add_agent_within(&a, 50, 2).unwrap();
        a.id = "a2".into();
        s.add_agent_within(&a, 50, 2).unwrap();
        a.id = "a3".into();
        assert!(matches!(s.add_agent_within(&a, 50, 2), Err(StoreError::Quota(_))));
        assert_eq!(s.enrollments_since("t1", 50).unwrap(), 2);
        assert_eq!(s.enrollments_since("t1", 101).unwrap(), 0, "older enrollments leave the window");
        s.add_agent_within(&a, 101, 2).expect("a new window");
        assert_eq!(s.enrollments_since("t2", 0).unwrap(), 0);
    }

    fn relay(id: &str, started_at: u64) -> RelayRecord {
        RelayRecord {
            id: id.into(),
            agent_url: format!("https://{id}.example:7443"),
            resource_host: format!("{id}.example"),
            admin_url: format!("http://{id}.example:7444"),
            version: "0.1.0".into(),
            started_at,
            heartbeat_at: started_at,
            state: RelayState::Active,
        }
    }

    #[test]
    fn relays_register_heartbeat_drain_and_are_forgotten_when_silent() {
        let (_d, s) = store();
        assert!(s.relays().unwrap().is_empty());
        s.register_relay(&relay("rly_b", 10)).unwrap();
        s.register_relay(&relay("rly_a", 10)).unwrap();
        s.register_relay(&relay("rly_c", 5)).unwrap();
        let ids = |s: &SqliteStore| s.relays().unwrap().into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(&s), ["rly_c", "rly_a", "rly_b"], "oldest first, then by id");
        assert_eq!(s.relays().unwrap()[1], relay("rly_a", 10), "stored as registered");

        assert_eq!(s.relay_heartbeat("rly_a", 20).unwrap(), Some(RelayState::Active));
        assert!(s.set_relay_state("rly_a", RelayState::Draining).unwrap());
        assert!(!s.set_relay_state("rly_nope", RelayState::Draining).unwrap());
        assert_eq!(s.relay_heartbeat("rly_a", 21).unwrap(), Some(RelayState::Draining), "set through another relay");
        assert_eq!(s.relay_heartbeat("rly_nope", 21).unwrap(), None, "a row that is gone asks to re-register");

        // Re-registering replaces the row (a restart with the same id).
        let mut again = relay("rly_b", 30);
        again.version = "0.2.0".into();
        s.register_relay(&again).unwrap();
        assert_eq!(s.relays().unwrap().last().unwrap(), &again);

        // rly_c (heartbeat 5) and nobody else is silent before 20.
        assert_eq!(s.forget_silent_relays(20).unwrap(), ["rly_c"]);
        assert_eq!(ids(&s), ["rly_a", "rly_b"]);
        assert!(s.forget_silent_relays(20).unwrap().is_empty());
        s.remove_relay("rly_a").unwrap();
        s.remove_relay("rly_a").unwrap();
        assert_eq!(ids(&s), ["rly_b"]);
        let r = s.relays().unwrap().remove(0);
        assert_eq!(serde_json::to_value(r.state).unwrap(), "active");
    }

    #[test]
    fn a_version_1_database_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute("INSERT INTO token_uses (jti, resource_id) VALUES ('j', 'r')", []).unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.token_use_revoked_at("j", "r").unwrap(), None);
        assert!(s.tokens(None).unwrap().is_empty());
    }
}
