//! The store on PostgreSQL, for several relays sharing one database (`--database-url
//! postgres://…`).
//!
//! The [`Store`] interface is synchronous, so this uses the synchronous `postgres` crate
//! (tokio-postgres underneath). Its `Client` drives its own small runtime and panics
//! when called on a tokio worker thread, where the relay's tasks call the store: so the
//! client lives on a thread of its own, owned by [`PgStore`], and each call is a closure
//! sent over a channel; the caller blocks for the reply, as it blocks on SQLite's mutex.
//! One connection, calls one at a time, as with SQLite.
//!
//! A dropped connection fails the call that saw it ([`StoreError::Unavailable`], naming
//! the server — host:port/database, never the password — the cause and what to do); the
//! next call connects again (within [`CONNECT_TIMEOUT`]).
//!
//! Several relays run on one database at once, so whatever must hold across them is
//! enforced by PostgreSQL, not by this process: the schema is created and migrated under
//! a transaction-scoped advisory lock (two relays starting on an empty database create
//! it once); [`Store::create_resource`] counts the quota, picks the lowest free port and
//! inserts in one transaction under another advisory lock (no duplicate port, no quota
//! overrun, and the unique `(scope, name)` turns the second of two racing creations into
//! [`StoreError::Conflict`]); [`Store::add_agent_within`] counts and inserts under an
//! advisory lock per JWT; rotation and deletion lock the resource's row first.

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::Duration;

use ::postgres::config::Host;
use ::postgres::error::SqlState;
use ::postgres::{Client, Config, NoTls, Row, Transaction};

use super::*;

/// How long connecting to PostgreSQL may take before the call fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Advisory lock keys (one bigint each; "slce" in the high half keeps clear of other
/// applications' keys on a shared server).
const LOCK_MIGRATE: i64 = 0x736c_6365_0000_0001;
const LOCK_RESOURCES: i64 = 0x736c_6365_0000_0002;
/// Lease creations, one at a time across relays (the port and the per-resource count).
const LOCK_LEASES: i64 = 0x736c_6365_0000_0003;
/// The first of the two int4 keys of the per-JWT enrollment lock (the second is the
/// JWT id's hash); the int4 pair and the bigint key spaces never overlap.
const LOCK_ENROLLMENTS: i32 = 0x736c_6365;

/// A failure inside a call: a store verdict (conflict, quota, …) or a PostgreSQL error,
/// which [`PgStore::with`] describes for the operator.
enum Fail {
    Store(StoreError),
    Pg(::postgres::Error),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

impl From<::postgres::Error> for Fail {
    fn from(e: ::postgres::Error) -> Self {
        Fail::Pg(e)
    }
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The client thread's state: the connection, made again when it dropped.
struct Connection {
    config: Config,
    server: String,
    client: Option<Client>,
}

impl Connection {
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            let client =
                self.config.connect(NoTls).map_err(|e| StoreError::Unavailable(describe_pg_error(&self.server, &e)))?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected just above"))
    }
}

/// The relay's state in a PostgreSQL database shared by every relay of the cluster.
pub struct PgStore {
    jobs: mpsc::Sender<Job>,
    /// host:port/database, named in every error (never the password).
    server: String,
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`),
    /// creating or migrating the schema. Errors say whether the server cannot be reached,
    /// refused the credentials or has no such database, and what to do.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let mut config: Config = url.parse().map_err(|e| {
            StoreError::Unavailable(format!(
                "--database-url {}: not a PostgreSQL connection URL ({e}); give \
                 postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                redacted_url(url)
            ))
        })?;
        config.connect_timeout(CONNECT_TIMEOUT);
        // A server that vanished without closing the connection is noticed within a minute.
        config.keepalives(true).keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("sluice-relay");
        }
        // The server's notices ("relation … already exists, skipping") are not the
        // operator's business; warnings and errors still come.
        if config.get_options().is_none() {
            config.options("-c client_min_messages=warning");
        }
        let server = server_name(&config);
        let (jobs, queue) = mpsc::channel::<Job>();
        let mut conn = Connection { config, server: server.clone(), client: None };
        std::thread::Builder::new()
            .name("sluice-postgres".into())
            .spawn(move || {
                for job in queue {
                    // A panic inside one call fails that call (its reply channel drops), not the store.
                    if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn))).is_err() {
                        conn.client = None;
                    }
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the PostgreSQL client thread: {e}")))?;
        let store = PgStore { jobs, server };
        store.with(migrate)?;
        Ok(store)
    }

    /// host:port/database of the server (no password).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Runs `f` on the client thread with a live connection; blocks for its answer.
    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, Fail> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |conn: &mut Connection| {
            let server = conn.server.clone();
            let out = conn.client().and_then(|c| {
                f(c).map_err(|e| match e {
                    Fail::Store(e) => e,
                    Fail::Pg(e) => StoreError::Unavailable(describe_pg_error(&server, &e)),
                })
            });
            let _ = reply.send(out);
        });
        let gone = || {
            StoreError::Unavailable(format!(
                "the PostgreSQL client thread for {} stopped (see the relay's log); restart the relay",
                self.server
            ))
        };
        self.jobs.send(job).map_err(|_| gone())?;
        let out = answer.recv().map_err(|_| gone())?;
        if matches!(out, Err(StoreError::Unavailable(_))) {
            crate::metrics::store_error();
        }
        out
    }
}

/// Creates or migrates the schema, once, however many relays start at the same time.
fn migrate(c: &mut Client) -> Result<(), Fail> {
    let mut tx = c.transaction()?;
    tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({LOCK_MIGRATE})"))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS sluice_schema_version (version BIGINT NOT NULL)")?;
    let version: i64 = match tx.query_opt("SELECT version FROM sluice_schema_version", &[])? {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO sluice_schema_version (version) VALUES (0)", &[])?;
            0
        }
    };
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(&for_postgres(sql))?;
        tx.execute("UPDATE sluice_schema_version SET version = $1", &[&((i + 1) as i64)])?;
    }
    tx.commit()?;
    Ok(())
}

/// host:port/database as the operator reads it, from the parsed URL.
fn server_name(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// `url` with its password (in the user info or a `password=` parameter) replaced by
/// `***`: the form every log line and error uses.
pub fn redacted_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..].find(['/', '?']).map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@') {
            let userinfo = &out[rest..rest + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest + colon + 1..rest + at, "***");
            }
        }
    }
    let mut from = 0;
    while let Some(i) = out[from..].find("password=") {
        let start = from + i + "password=".len();
        let end = out[start..].find(['&', ' ']).map_or(out.len(), |j| start + j);
        out.replace_range(start..end, "***");
        from = start + 3;
    }
    out
}

/// What an operator reads about a failed PostgreSQL call: the server, the cause, what to do.
pub fn describe_pg_error(server: &str, e: &::postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        // Not an answer from the server: the connection could not be made or was lost.
        let mut cause = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            let text = s.to_string();
            if !cause.contains(&text) {
                cause = format!("{cause}: {text}");
            }
            source = s.source();
        }
        return format!(
            "cannot reach PostgreSQL at {server}: {cause} — check that the server runs and accepts connections from \
             this host, and the host and port in --database-url; the relay connects again at its next call"
        );
    };
    let code = db.code();
    let what_to_do = if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        "check the user and password in --database-url, and that the server's pg_hba.conf lets this host in".to_owned()
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        "create the database, owned by the relay's role (`createdb -O ROLE DATABASE`), or fix its name in \
         --database-url"
            .to_owned()
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        "the relay's role must own the database to create and migrate its tables (`ALTER DATABASE … OWNER TO …`)"
            .to_owned()
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        "this server is a read-only standby: point --database-url at the primary".to_owned()
    } else if *code == SqlState::TOO_MANY_CONNECTIONS {
        "the server has no connection left: raise its max_connections or use fewer clients".to_owned()
    } else if *code == SqlState::DISK_FULL {
        "the server's disk is full: free space on it".to_owned()
    } else if *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
    {
        "the server is shutting down or starting; the relay connects again at its next call".to_owned()
    } else {
        "see the PostgreSQL server's log".to_owned()
    };
    format!("PostgreSQL at {server} failed: {} (SQLSTATE {}) — {what_to_do}", db.message(), code.code())
}

fn is_unique_violation(e: &::postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn resource_row(r: &Row) -> Resource {
    Resource {
        id: r.get(0),
        customer_id: r.get(1),
        name: r.get(2),
        port: r.get::<_, i64>(3) as u16,
        generation: r.get::<_, i64>(4) as u64,
        created_at: r.get::<_, i64>(5) as u64,
        last_seen_at: r.get::<_, Option<i64>>(6).map(|v| v as u64),
    }
}

fn token_row(r: &Row) -> TokenRecord {
    TokenRecord {
        jti: r.get(0),
        customer_id: r.get(1),
        resource_id: r.get(2),
        issued_at: r.get::<_, i64>(3) as u64,
        expires_at: r.get::<_, Option<i64>>(4).map(|v| v as u64),
        revoked_at: r.get::<_, Option<i64>>(5).map(|v| v as u64),
    }
}

fn customer_row(r: &Row) -> Customer {
    Customer { id: r.get(0), name: r.get(1), created_at: r.get::<_, i64>(2) as u64 }
}

fn relay_row(r: &Row) -> RelayRecord {
    RelayRecord {
        id: r.get(0),
        agent_url: r.get(1),
        resource_host: r.get(2),
        admin_url: r.get(3),
        version: r.get(4),
        started_at: r.get::<_, i64>(5) as u64,
        heartbeat_at: r.get::<_, i64>(6) as u64,
        state: RelayState::from_stored(r.get(7)),
    }
}

/// Revokes the JWTs issued for `resource_id`, and the use for `resource_id` of every
/// other JWT that enrolled agents of it (as SQLite's twin does).
fn revoke_credentials_of(tx: &mut Transaction<'_>, resource_id: &str, now: u64) -> Result<ResourceRevocation, Fail> {
    let mut jtis = |sql: &str| -> Result<Vec<String>, Fail> {
        Ok(tx.query(sql, &[&resource_id])?.iter().map(|r| r.get(0)).collect())
    };
    let revoked_resource_jwts = jtis(
        "SELECT jti FROM registration_tokens WHERE resource_id = $1 AND revoked_at IS NULL ORDER BY issued_at, jti",
    )?;
    let blocked_for_resource_jwts = jtis(
        "SELECT u.jti FROM token_uses u JOIN registration_tokens t ON t.jti = u.jti
         WHERE u.resource_id = $1 AND u.revoked_at IS NULL
           AND t.resource_id IS NULL AND t.revoked_at IS NULL
         ORDER BY t.issued_at, u.jti",
    )?;
    let now = now as i64;
    tx.execute(
        "UPDATE registration_tokens SET revoked_at = $2 WHERE resource_id = $1 AND revoked_at IS NULL",
        &[&resource_id, &now],
    )?;
    tx.execute(
        "UPDATE token_uses SET revoked_at = $2 WHERE resource_id = $1 AND revoked_at IS NULL",
        &[&resource_id, &now],
    )?;
    Ok(ResourceRevocation { revoked_resource_jwts, blocked_for_resource_jwts })
}

impl Store for PgStore {
    fn check(&self) -> Result<(), String> {
        self.with(|c| Ok(c.batch_execute("SELECT 1")?)).map_err(|e| e.to_string())
    }

    fn location(&self) -> String {
        format!("PostgreSQL at {}", self.server)
    }

    fn create_customer(&self, id: &str, name: &str, now: u64) -> Result<Customer, StoreError> {
        let (id, name) = (id.to_owned(), name.to_owned());
        self.with(move |c| {
            match c.execute(
                "INSERT INTO customers (id, name, created_at) VALUES ($1, $2, $3)",
                &[&id, &name, &(now as i64)],
            ) {
                Ok(_) => Ok(Customer { id, name, created_at: now }),
                Err(e) if is_unique_violation(&e) => Err(customer_name_taken(&name).into()),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn customers(&self) -> Result<Vec<Customer>, StoreError> {
        self.with(|c| {
            Ok(c.query("SELECT id, name, created_at FROM customers ORDER BY created_at, name", &[])?
                .iter()
                .map(customer_row)
                .collect())
        })
    }

    fn customer(&self, id: &str) -> Result<Option<Customer>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            Ok(c.query_opt("SELECT id, name, created_at FROM customers WHERE id = $1", &[&id])?
                .as_ref()
                .map(customer_row))
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
        let (id, customer_id, name) = (id.to_owned(), customer_id.map(str::to_owned), name.to_owned());
        self.with(move |c| {
            let mut tx = c.transaction()?;
            // Every relay's creations one at a time: the count, the free port and the
            // insert below are consistent across relays.
            tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({LOCK_RESOURCES})"))?;
            let scope = customer_id.clone().unwrap_or_default();
            let owned: i64 = tx.query_one("SELECT COUNT(*) FROM resources WHERE scope = $1", &[&scope])?.get(0);
            within_resource_quota(customer_id.as_deref(), owned as u64, max_per_customer)?;
            let used: HashSet<u16> =
                tx.query("SELECT port FROM resources", &[])?.iter().map(|r| r.get::<_, i64>(0) as u16).collect();
            let port = lowest_free_port(&ports, &used)?;
            let inserted = tx.execute(
                "INSERT INTO resources (id, customer_id, scope, name, port, generation, created_at)
                 VALUES ($1, $2, $3, $4, $5, 1, $6)",
                &[&id, &customer_id, &scope, &name, &i64::from(port), &(now as i64)],
            );
            match inserted {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => return Err(resource_name_taken(&name).into()),
                Err(e) => return Err(e.into()),
            }
            tx.commit()?;
            Ok(Resource { id, customer_id, name, port, generation: 1, created_at: now, last_seen_at: None })
        })
    }

    fn resource(&self, id: &str) -> Result<Option<Resource>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            Ok(c.query_opt(&format!("SELECT {RESOURCE_COLS} FROM resources WHERE id = $1"), &[&id])?
                .as_ref()
                .map(resource_row))
        })
    }

    fn resource_by_name(&self, customer_id: Option<&str>, name: &str) -> Result<Option<Resource>, StoreError> {
        let (scope, name) = (customer_id.unwrap_or("").to_owned(), name.to_owned());
        self.with(move |c| {
            Ok(c.query_opt(
                &format!("SELECT {RESOURCE_COLS} FROM resources WHERE scope = $1 AND name = $2"),
                &[&scope, &name],
            )?
            .as_ref()
            .map(resource_row))
        })
    }

    fn resources(&self) -> Result<Vec<Resource>, StoreError> {
        self.with(|c| {
            Ok(c.query(&format!("SELECT {RESOURCE_COLS} FROM resources ORDER BY created_at, name"), &[])?
                .iter()
                .map(resource_row)
                .collect())
        })
    }

    fn rotate_resource(&self, id: &str, now: u64) -> Result<(u64, ResourceRevocation), StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            // The row lock orders concurrent rotations (and deletions) of one resource.
            let generation: i64 = tx
                .query_opt(
                    "UPDATE resources SET generation = generation + 1 WHERE id = $1 RETURNING generation",
                    &[&id],
                )?
                .ok_or_else(|| StoreError::Unavailable(format!("no resource {id} to rotate")))?
                .get(0);
            let revoked = revoke_credentials_of(&mut tx, &id, now)?;
            tx.commit()?;
            Ok((generation as u64, revoked))
        })
    }

    fn delete_resource(&self, id: &str, now: u64) -> Result<Option<ResourceRevocation>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            if tx.query_opt("SELECT 1 FROM resources WHERE id = $1 FOR UPDATE", &[&id])?.is_none() {
                // Nothing existed: leave no trace of a revocation.
                return Ok(None);
            }
            let revoked = revoke_credentials_of(&mut tx, &id, now)?;
            tx.execute("DELETE FROM agents WHERE resource_id = $1", &[&id])?;
            tx.execute("DELETE FROM resources WHERE id = $1", &[&id])?;
            tx.commit()?;
            Ok(Some(revoked))
        })
    }

    fn touch_resource(&self, id: &str, now: u64) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            c.execute("UPDATE resources SET last_seen_at = $2 WHERE id = $1", &[&id, &(now as i64)])?;
            Ok(())
        })
    }

    fn record_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let t = t.clone();
        self.with(move |c| {
            c.execute(
                &numbered_placeholders(INSERT_TOKEN),
                &[
                    &t.jti,
                    &t.customer_id,
                    &t.resource_id,
                    &(t.issued_at as i64),
                    &t.expires_at.map(|v| v as i64),
                    &t.revoked_at.map(|v| v as i64),
                ],
            )?;
            Ok(())
        })
    }

    fn token(&self, jti: &str) -> Result<Option<TokenRecord>, StoreError> {
        let jti = jti.to_owned();
        self.with(move |c| {
            Ok(c.query_opt(&format!("SELECT {TOKEN_COLS} FROM registration_tokens WHERE jti = $1"), &[&jti])?
                .as_ref()
                .map(token_row))
        })
    }

    fn tokens(&self, customer_id: Option<&str>) -> Result<Vec<TokenUsage>, StoreError> {
        let customer_id = customer_id.map(str::to_owned);
        self.with(move |c| {
            let rows = c.query(
                &format!(
                    "SELECT {TOKEN_COLS}, (SELECT COUNT(*) FROM agents a WHERE a.jti = t.jti)
                     FROM registration_tokens t
                     WHERE $1::text IS NULL OR t.customer_id = $1::text
                     ORDER BY t.issued_at, t.seq, t.jti"
                ),
                &[&customer_id],
            )?;
            Ok(rows.iter().map(|r| TokenUsage { token: token_row(r), agents: r.get::<_, i64>(6) as u64 }).collect())
        })
    }

    fn revoke_token(&self, jti: &str, now: u64) -> Result<TokenRevocation, StoreError> {
        let jti = jti.to_owned();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            let found = tx
                .query_opt(&format!("SELECT {TOKEN_COLS} FROM registration_tokens WHERE jti = $1 FOR UPDATE"), &[&jti])?
                .as_ref()
                .map(token_row);
            let outcome = match found {
                None => TokenRevocation::Unknown,
                Some(t) if t.revoked_at.is_some() => TokenRevocation::AlreadyRevoked(t),
                Some(mut t) => {
                    tx.execute(
                        "UPDATE registration_tokens SET revoked_at = $2 WHERE jti = $1",
                        &[&jti, &(now as i64)],
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
        let jti = jti.to_owned();
        self.with(move |c| {
            Ok(c.query("SELECT DISTINCT resource_id FROM agents WHERE jti = $1 ORDER BY resource_id", &[&jti])?
                .iter()
                .map(|r| r.get(0))
                .collect())
        })
    }

    fn mark_token_used(&self, jti: &str, resource_id: &str) -> Result<(), StoreError> {
        let (jti, resource_id) = (jti.to_owned(), resource_id.to_owned());
        self.with(move |c| {
            c.execute(
                "INSERT INTO token_uses (jti, resource_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&jti, &resource_id],
            )?;
            Ok(())
        })
    }

    fn token_use_revoked_at(&self, jti: &str, resource_id: &str) -> Result<Option<u64>, StoreError> {
        let (jti, resource_id) = (jti.to_owned(), resource_id.to_owned());
        self.with(move |c| {
            let at: Option<Option<i64>> = c
                .query_opt(
                    "SELECT revoked_at FROM token_uses WHERE jti = $1 AND resource_id = $2",
                    &[&jti, &resource_id],
                )?
                .map(|r| r.get(0));
            Ok(at.flatten().map(|v| v as u64))
        })
    }

    fn add_agent(&self, a: &AgentRecord) -> Result<(), StoreError> {
        let a = a.clone();
        self.with(move |c| {
            insert_agent(c, &a)?;
            Ok(())
        })
    }

    fn add_agent_within(&self, a: &AgentRecord, since: u64, max: u32) -> Result<(), StoreError> {
        let a = a.clone();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            // Enrollments with one JWT one at a time, across relays: the count holds.
            tx.execute("SELECT pg_advisory_xact_lock($1, hashtext(COALESCE($2, '')))", &[&LOCK_ENROLLMENTS, &a.jti])?;
            let recent: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM agents WHERE jti = $1 AND enrolled_at >= $2",
                    &[&a.jti, &(since as i64)],
                )?
                .get(0);
            within_enrollment_quota(recent as u64, since, max)?;
            insert_agent(&mut tx, &a)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn enrollments_since(&self, jti: &str, since: u64) -> Result<u64, StoreError> {
        let jti = jti.to_owned();
        self.with(move |c| {
            let n: i64 = c
                .query_one(
                    "SELECT COUNT(*) FROM agents WHERE jti = $1 AND enrolled_at >= $2",
                    &[&jti, &(since as i64)],
                )?
                .get(0);
            Ok(n as u64)
        })
    }

    fn agents_ever_connected(&self, resource_id: &str) -> Result<bool, StoreError> {
        let resource_id = resource_id.to_owned();
        self.with(move |c| {
            Ok(c.query_one(
                "SELECT EXISTS (SELECT 1 FROM agents WHERE resource_id = $1 AND connected_at IS NOT NULL)",
                &[&resource_id],
            )?
            .get(0))
        })
    }

    fn mark_agent_connected(&self, agent_id: &str, now: u64) -> Result<(), StoreError> {
        let agent_id = agent_id.to_owned();
        self.with(move |c| {
            c.execute("UPDATE agents SET connected_at = $2 WHERE id = $1", &[&agent_id, &(now as i64)])?;
            Ok(())
        })
    }

    fn register_relay(&self, r: &RelayRecord) -> Result<(), StoreError> {
        let r = r.clone();
        self.with(move |c| {
            c.execute(
                &numbered_placeholders(UPSERT_RELAY),
                &[
                    &r.id,
                    &r.agent_url,
                    &r.resource_host,
                    &r.admin_url,
                    &r.version,
                    &(r.started_at as i64),
                    &(r.heartbeat_at as i64),
                    &r.state.as_str(),
                ],
            )?;
            Ok(())
        })
    }

    fn relay_heartbeat(&self, id: &str, now: u64) -> Result<Option<RelayState>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            Ok(c.query_opt("UPDATE relays SET heartbeat_at = $2 WHERE id = $1 RETURNING state", &[&id, &(now as i64)])?
                .map(|r| RelayState::from_stored(r.get(0))))
        })
    }

    fn set_relay_state(&self, id: &str, state: RelayState) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.with(move |c| Ok(c.execute("UPDATE relays SET state = $2 WHERE id = $1", &[&id, &state.as_str()])? > 0))
    }

    fn relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        self.with(|c| {
            Ok(c.query(&format!("SELECT {RELAY_COLS} FROM relays ORDER BY started_at, id"), &[])?
                .iter()
                .map(relay_row)
                .collect())
        })
    }

    fn remove_relay(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            c.execute("DELETE FROM relays WHERE id = $1", &[&id])?;
            Ok(())
        })
    }

    fn forget_silent_relays(&self, before: u64) -> Result<Vec<String>, StoreError> {
        self.with(move |c| {
            let mut ids: Vec<String> = c
                .query("DELETE FROM relays WHERE heartbeat_at < $1 RETURNING id", &[&(before as i64)])?
                .iter()
                .map(|r| r.get(0))
                .collect();
            ids.sort();
            Ok(ids)
        })
    }

    fn create_lease(&self, new: &NewLease, ports: RangeInclusive<u16>, max_active: u32) -> Result<Lease, StoreError> {
        let new = new.clone();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            // Every relay's lease creations one at a time: the count and the free port hold.
            tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({LOCK_LEASES})"))?;
            tx.execute(
                "UPDATE leases SET ended_at = expires_at, end_reason = 'expired'
                 WHERE ended_at IS NULL AND expires_at <= $1",
                &[&(new.created_at as i64)],
            )?;
            let active: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM leases WHERE resource_id = $1 AND ended_at IS NULL",
                    &[&new.resource_id],
                )?
                .get(0);
            within_lease_quota(&new.resource_id, active as u64, max_active)?;
            let used: HashSet<u16> = tx
                .query("SELECT port FROM leases WHERE ended_at IS NULL", &[])?
                .iter()
                .map(|r| r.get::<_, i64>(0) as u16)
                .collect();
            let port = lowest_free_lease_port(&ports, &used)?;
            tx.execute(
                "INSERT INTO leases (id, resource_id, port, created_at, expires_at, max_connections, source)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &new.id,
                    &new.resource_id,
                    &i64::from(port),
                    &(new.created_at as i64),
                    &(new.expires_at as i64),
                    &new.max_connections.map(i64::from),
                    &new.source,
                ],
            )?;
            tx.commit()?;
            Ok(Lease {
                id: new.id,
                resource_id: new.resource_id,
                port,
                created_at: new.created_at,
                expires_at: new.expires_at,
                max_connections: new.max_connections,
                connections_used: 0,
                source: new.source,
                ended_at: None,
                end_reason: None,
            })
        })
    }

    fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            Ok(c.query_opt(&format!("SELECT {LEASE_COLS} FROM leases WHERE id = $1"), &[&id])?.as_ref().map(lease_row))
        })
    }

    fn leases(&self, resource_id: Option<&str>, ended_since: u64) -> Result<Vec<Lease>, StoreError> {
        let resource_id = resource_id.map(str::to_owned);
        self.with(move |c| {
            Ok(c.query(
                &format!(
                    "SELECT {LEASE_COLS} FROM leases
                     WHERE ($1::text IS NULL OR resource_id = $1::text) AND (ended_at IS NULL OR ended_at >= $2)
                     ORDER BY created_at DESC, id"
                ),
                &[&resource_id, &(ended_since as i64)],
            )?
            .iter()
            .map(lease_row)
            .collect())
        })
    }

    fn end_lease(&self, id: &str, reason: &str, now: u64) -> Result<Option<Lease>, StoreError> {
        let (id, reason) = (id.to_owned(), reason.to_owned());
        self.with(move |c| {
            c.execute(
                "UPDATE leases SET ended_at = $2, end_reason = $3 WHERE id = $1 AND ended_at IS NULL",
                &[&id, &(now as i64), &reason],
            )?;
            Ok(c.query_opt(&format!("SELECT {LEASE_COLS} FROM leases WHERE id = $1"), &[&id])?.as_ref().map(lease_row))
        })
    }

    fn expire_leases(&self, now: u64) -> Result<Vec<Lease>, StoreError> {
        self.with(move |c| {
            Ok(c.query(
                &format!(
                    "UPDATE leases SET ended_at = expires_at, end_reason = 'expired'
                     WHERE ended_at IS NULL AND expires_at <= $1 RETURNING {LEASE_COLS}"
                ),
                &[&(now as i64)],
            )?
            .iter()
            .map(lease_row)
            .collect())
        })
    }

    fn use_lease(&self, id: &str, now: u64) -> Result<Result<Lease, LeaseRefusal>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            let counted = c.query_opt(
                &numbered_placeholders(&format!("{USE_LEASE} RETURNING {LEASE_COLS}")),
                &[&id, &(now as i64)],
            )?;
            if let Some(row) = counted {
                return Ok(Ok(lease_row(&row)));
            }
            let found = c.query_opt(&format!("SELECT {LEASE_COLS} FROM leases WHERE id = $1"), &[&id])?;
            Ok(Err(lease_refusal(found.as_ref().map(lease_row).as_ref(), now)))
        })
    }

    fn set_resource_leased_only(&self, id: &str, leased_only: bool) -> Result<bool, StoreError> {
        let id = id.to_owned();
        let access = if leased_only { "leased" } else { "open" };
        self.with(move |c| Ok(c.execute("UPDATE resources SET access = $2 WHERE id = $1", &[&id, &access])? > 0))
    }

    fn leased_only_resources(&self) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            Ok(c.query("SELECT id FROM resources WHERE access = 'leased' ORDER BY id", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect())
        })
    }

    fn create_api_token(&self, t: &ApiTokenRecord) -> Result<(), StoreError> {
        let t = t.clone();
        self.with(move |c| {
            c.execute(
                &numbered_placeholders(INSERT_API_TOKEN),
                &[
                    &t.id,
                    &t.name,
                    &t.role,
                    &t.customer_id,
                    &t.token_hash,
                    &(t.created_at as i64),
                    &t.expires_at.map(|v| v as i64),
                    &t.revoked_at.map(|v| v as i64),
                ],
            )?;
            Ok(())
        })
    }

    fn api_token_by_hash(&self, token_hash: &str) -> Result<Option<ApiTokenRecord>, StoreError> {
        let token_hash = token_hash.to_owned();
        self.with(move |c| {
            Ok(c.query_opt(&format!("SELECT {API_TOKEN_COLS} FROM api_tokens WHERE token_hash = $1"), &[&token_hash])?
                .as_ref()
                .map(api_token_row))
        })
    }

    fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        self.with(|c| {
            Ok(c.query(&format!("SELECT {API_TOKEN_COLS} FROM api_tokens ORDER BY created_at, id"), &[])?
                .iter()
                .map(api_token_row)
                .collect())
        })
    }

    fn revoke_api_token(&self, id: &str, now: u64) -> Result<Option<ApiTokenRecord>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            c.execute(
                "UPDATE api_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                &[&id, &(now as i64)],
            )?;
            Ok(c.query_opt(&format!("SELECT {API_TOKEN_COLS} FROM api_tokens WHERE id = $1"), &[&id])?
                .as_ref()
                .map(api_token_row))
        })
    }

    fn append_audit(&self, r: &AuditRecord) -> Result<(), StoreError> {
        let (resource, resource_name) = r.resource_columns();
        let (id, at_ms, kind, json) = (r.id.clone(), r.at_ms as i64, r.kind(), audit_json(r));
        self.with(move |c| {
            c.execute(&numbered_placeholders(INSERT_AUDIT), &[&id, &at_ms, &kind, &resource, &resource_name, &json])?;
            Ok(())
        })
    }

    fn append_audits(&self, rs: &[AuditRecord]) -> Result<(), StoreError> {
        let rows: Vec<_> = rs
            .iter()
            .map(|r| {
                let (resource, resource_name) = r.resource_columns();
                (r.id.clone(), r.at_ms as i64, r.kind(), resource, resource_name, audit_json(r))
            })
            .collect();
        self.with(move |c| {
            let mut tx = c.transaction()?;
            let st = tx.prepare(&numbered_placeholders(INSERT_AUDIT))?;
            for (id, at_ms, kind, resource, resource_name, json) in &rows {
                tx.execute(&st, &[id, at_ms, kind, resource, resource_name, json])?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let (since, resource, limit) = (q.since_ms as i64, q.resource.clone(), i64::from(q.limit));
        let rows: Vec<String> = self.with(move |c| {
            let sql = numbered_placeholders(SELECT_AUDIT).replace("$2", "$2::text");
            Ok(c.query(&sql, &[&since, &resource, &limit])?.iter().map(|r| r.get(0)).collect())
        })?;
        rows.iter().rev().map(|s| audit_from_json(s)).collect()
    }

    fn forget_audit_before(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.with(move |c| Ok(c.execute("DELETE FROM audit_log WHERE at_ms < $1", &[&(before_ms as i64)])?))
    }
}

fn api_token_row(r: &Row) -> ApiTokenRecord {
    ApiTokenRecord {
        id: r.get(0),
        name: r.get(1),
        role: r.get(2),
        customer_id: r.get(3),
        token_hash: r.get(4),
        created_at: r.get::<_, i64>(5) as u64,
        expires_at: r.get::<_, Option<i64>>(6).map(|v| v as u64),
        revoked_at: r.get::<_, Option<i64>>(7).map(|v| v as u64),
    }
}

fn lease_row(r: &Row) -> Lease {
    Lease {
        id: r.get(0),
        resource_id: r.get(1),
        port: r.get::<_, i64>(2) as u16,
        created_at: r.get::<_, i64>(3) as u64,
        expires_at: r.get::<_, i64>(4) as u64,
        max_connections: r.get::<_, Option<i64>>(5).map(|v| v as u32),
        connections_used: r.get::<_, i64>(6) as u64,
        source: r.get(7),
        ended_at: r.get::<_, Option<i64>>(8).map(|v| v as u64),
        end_reason: r.get(9),
    }
}

fn insert_agent(c: &mut impl ::postgres::GenericClient, a: &AgentRecord) -> Result<u64, ::postgres::Error> {
    c.execute(
        "INSERT INTO agents (id, resource_id, generation, hostname, enrolled_at, jti) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&a.id, &a.resource_id, &(a.generation as i64), &a.hostname, &(a.enrolled_at as i64), &a.jti],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_leave_the_url() {
        let r = redacted_url;
        assert_eq!(
            r("postgres://sluice:s3cret@db.example:5432/sluice"),
            "postgres://sluice:***@db.example:5432/sluice"
        );
        assert_eq!(r("postgresql://sluice@db/sluice"), "postgresql://sluice@db/sluice");
        assert_eq!(r("postgres://u:p%40ss@h/d?sslmode=disable"), "postgres://u:***@h/d?sslmode=disable");
        assert_eq!(r("postgres://h/d?user=u&password=hunter2&x=1"), "postgres://h/d?user=u&password=***&x=1");
        assert_eq!(r("host=h user=u password=hunter2 dbname=d"), "host=h user=u password=*** dbname=d");
    }

    #[test]
    fn the_server_is_named_without_credentials() {
        let c: Config = "postgres://u:secret@db.example:6543/sl".parse().unwrap();
        assert_eq!(server_name(&c), "db.example:6543/sl");
        let c: Config = "postgres://u@db.example".parse().unwrap();
        assert_eq!(server_name(&c), "db.example:5432/u");
    }

    #[test]
    fn an_unreachable_server_is_named_with_what_to_do() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("postgres://sluice:topsecret@127.0.0.1:{port}/sluice");
        let err = PgStore::open(&url).err().expect("nothing listens there").to_string();
        assert!(err.starts_with(&format!("cannot reach PostgreSQL at 127.0.0.1:{port}/sluice: ")), "{err}");
        assert!(err.contains("check that the server runs"), "{err}");
        assert!(!err.contains("topsecret"), "{err}");
    }
}
