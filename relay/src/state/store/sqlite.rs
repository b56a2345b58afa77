//! The embedded store: one SQLite file in the data directory (the default engine).

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use super::*;

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
    fn check(&self) -> Result<(), String> {
        self.check_file()
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    /// Saves a copy of the open database next to its path and says where (or why not):
    /// what can be saved of a file deleted or replaced under the relay.
    fn rescue(&self) -> String {
        let to = crate::state::data_dir::recovered_copy_path(&self.path, sluice_proto::identity::unix_now());
        let saved = match self.save_copy(&to) {
            Ok(()) => {
                let db = self.path.display();
                format!(
                    "A copy of the open database was saved to {}: stop the relay, delete {db}-wal and {db}-shm, move \
                     that copy to {db}, and start the relay again.",
                    to.display()
                )
            }
            Err(e) => format!("Saving a copy of the open database to {} failed too: {e}.", to.display()),
        };
        format!(
            "{saved} Do not restart the relay before the database is back at its path: it refuses to start without it \
             (see docs/operations.md, \"The database file\")"
        )
    }

    fn create_customer(&self, id: &str, name: &str, now: u64) -> Result<Customer, StoreError> {
        self.with(|c| {
            match c.execute(
                "INSERT INTO customers (id, name, created_at) VALUES (?1, ?2, ?3)",
                params![id, name, now as i64],
            ) {
                Ok(_) => Ok(Customer { id: id.into(), name: name.into(), created_at: now }),
                Err(e) if is_unique_violation(&e) => Err(customer_name_taken(name)),
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
            within_resource_quota(customer_id, owned as u64, max_per_customer)?;
            let used: std::collections::HashSet<u16> = {
                let mut st = tx.prepare("SELECT port FROM resources")?;
                st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
            };
            let port = lowest_free_port(&ports, &used)?;
            let res = tx.execute(
                "INSERT INTO resources (id, customer_id, scope, name, port, generation, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6)",
                params![id, customer_id, customer_id.unwrap_or(""), name, port, now as i64],
            );
            match res {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => {
                    return Err(resource_name_taken(name));
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
                INSERT_TOKEN,
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
                 ORDER BY t.issued_at, t.seq, t.jti"
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
                "INSERT INTO token_uses (jti, resource_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
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
            within_enrollment_quota(recent as u64, since, max)?;
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
                UPSERT_RELAY,
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

    fn create_lease(&self, new: &NewLease, ports: RangeInclusive<u16>, max_active: u32) -> Result<Lease, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE leases SET ended_at = expires_at, end_reason = 'expired'
                 WHERE ended_at IS NULL AND expires_at <= ?1",
                [new.created_at as i64],
            )?;
            let active: i64 = tx.query_row(
                "SELECT COUNT(*) FROM leases WHERE resource_id = ?1 AND ended_at IS NULL",
                [&new.resource_id],
                |r| r.get(0),
            )?;
            within_lease_quota(&new.resource_id, active as u64, max_active)?;
            let used: std::collections::HashSet<u16> = {
                let mut st = tx.prepare("SELECT port FROM leases WHERE ended_at IS NULL")?;
                st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
            };
            let port = lowest_free_lease_port(&ports, &used)?;
            tx.execute(
                "INSERT INTO leases (id, resource_id, port, created_at, expires_at, max_connections, source)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    new.id,
                    new.resource_id,
                    port,
                    new.created_at as i64,
                    new.expires_at as i64,
                    new.max_connections,
                    new.source
                ],
            )?;
            tx.commit()?;
            Ok(Lease {
                id: new.id.clone(),
                resource_id: new.resource_id.clone(),
                port,
                created_at: new.created_at,
                expires_at: new.expires_at,
                max_connections: new.max_connections,
                connections_used: 0,
                source: new.source.clone(),
                ended_at: None,
                end_reason: None,
            })
        })
    }

    fn lease(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(&format!("SELECT {LEASE_COLS} FROM leases WHERE id = ?1"), [id], lease_row).optional()?)
        })
    }

    fn leases(&self, resource_id: Option<&str>, ended_since: u64) -> Result<Vec<Lease>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {LEASE_COLS} FROM leases
                 WHERE (?1 IS NULL OR resource_id = ?1) AND (ended_at IS NULL OR ended_at >= ?2)
                 ORDER BY created_at DESC, id"
            ))?;
            let rows = st.query_map(params![resource_id, ended_since as i64], lease_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn end_lease(&self, id: &str, reason: &str, now: u64) -> Result<Option<Lease>, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE leases SET ended_at = ?2, end_reason = ?3 WHERE id = ?1 AND ended_at IS NULL",
                params![id, now as i64, reason],
            )?;
            Ok(c.query_row(&format!("SELECT {LEASE_COLS} FROM leases WHERE id = ?1"), [id], lease_row).optional()?)
        })
    }

    fn expire_leases(&self, now: u64) -> Result<Vec<Lease>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "UPDATE leases SET ended_at = expires_at, end_reason = 'expired'
                 WHERE ended_at IS NULL AND expires_at <= ?1 RETURNING {LEASE_COLS}"
            ))?;
            let rows = st.query_map([now as i64], lease_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn use_lease(&self, id: &str, now: u64) -> Result<Result<Lease, LeaseRefusal>, StoreError> {
        self.with(|c| {
            let counted = c
                .query_row(&format!("{USE_LEASE} RETURNING {LEASE_COLS}"), params![id, now as i64], lease_row)
                .optional()?;
            if let Some(l) = counted {
                return Ok(Ok(l));
            }
            let found =
                c.query_row(&format!("SELECT {LEASE_COLS} FROM leases WHERE id = ?1"), [id], lease_row).optional()?;
            Ok(Err(lease_refusal(found.as_ref(), now)))
        })
    }

    fn set_resource_leased_only(&self, id: &str, leased_only: bool) -> Result<bool, StoreError> {
        let access = if leased_only { "leased" } else { "open" };
        self.with(|c| Ok(c.execute("UPDATE resources SET access = ?2 WHERE id = ?1", params![id, access])? > 0))
    }

    fn leased_only_resources(&self) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT id FROM resources WHERE access = 'leased' ORDER BY id")?;
            let rows = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn create_api_token(&self, t: &ApiTokenRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                INSERT_API_TOKEN,
                params![
                    t.id,
                    t.name,
                    t.role,
                    t.customer_id,
                    t.token_hash,
                    t.created_at as i64,
                    t.expires_at.map(|v| v as i64),
                    t.revoked_at.map(|v| v as i64)
                ],
            )?;
            Ok(())
        })
    }

    fn api_token_by_hash(&self, token_hash: &str) -> Result<Option<ApiTokenRecord>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {API_TOKEN_COLS} FROM api_tokens WHERE token_hash = ?1"),
                [token_hash],
                api_token_row,
            )
            .optional()?)
        })
    }

    fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(&format!("SELECT {API_TOKEN_COLS} FROM api_tokens ORDER BY created_at, id"))?;
            let rows = st.query_map([], api_token_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn revoke_api_token(&self, id: &str, now: u64) -> Result<Option<ApiTokenRecord>, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE api_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now as i64],
            )?;
            Ok(c.query_row(&format!("SELECT {API_TOKEN_COLS} FROM api_tokens WHERE id = ?1"), [id], api_token_row)
                .optional()?)
        })
    }

    fn append_audit(&self, r: &AuditRecord) -> Result<(), StoreError> {
        let (resource, resource_name) = r.resource_columns();
        self.with(|c| {
            c.execute(INSERT_AUDIT, params![r.id, r.at_ms as i64, r.kind(), resource, resource_name, audit_json(r)])?;
            Ok(())
        })
    }

    fn append_audits(&self, rs: &[AuditRecord]) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(INSERT_AUDIT)?;
                for r in rs {
                    let (resource, resource_name) = r.resource_columns();
                    st.execute(params![r.id, r.at_ms as i64, r.kind(), resource, resource_name, audit_json(r)])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let rows: Vec<String> = self.with(|c| {
            let mut st = c.prepare(SELECT_AUDIT)?;
            let rows = st
                .query_map(params![q.since_ms as i64, q.resource, i64::from(q.limit)], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })?;
        rows.iter().rev().map(|s| audit_from_json(s)).collect()
    }

    fn forget_audit_before(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.with(|c| Ok(c.execute("DELETE FROM audit_log WHERE at_ms < ?1", [before_ms as i64])? as u64))
    }
}

fn api_token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ApiTokenRecord> {
    Ok(ApiTokenRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        role: r.get(2)?,
        customer_id: r.get(3)?,
        token_hash: r.get(4)?,
        created_at: r.get::<_, i64>(5)? as u64,
        expires_at: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        revoked_at: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
    })
}

fn lease_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        id: r.get(0)?,
        resource_id: r.get(1)?,
        port: r.get(2)?,
        created_at: r.get::<_, i64>(3)? as u64,
        expires_at: r.get::<_, i64>(4)? as u64,
        max_connections: r.get(5)?,
        connections_used: r.get::<_, i64>(6)? as u64,
        source: r.get(7)?,
        ended_at: r.get::<_, Option<i64>>(8)?.map(|v| v as u64),
        end_reason: r.get(9)?,
    })
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
