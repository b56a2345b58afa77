//! `sluice backup` and `sluice restore`: a consistent copy of a relay's state while it
//! runs, and a fresh data directory made from one.
//!
//! A backup is a directory (0700) holding the data directory's identity files (CA and
//! its key, the JWT signing key, the admin token; 0600 each), the SQLite store as
//! `sluice.db`, and `backup.json`, the manifest ([`Manifest`]: what is in it, row counts).
//!
//! - The store is copied with SQLite's online backup API, in one step: it reads one
//!   snapshot of the database (a read transaction; in WAL mode the running relay keeps
//!   writing meanwhile), so the copy holds every transaction committed before it began
//!   and none half. Copying the file (`cp`) instead can miss what still sits in the
//!   `-wal` file, or catch it half-written.
//! - It takes no lock: the running relay holds an exclusive `flock` on the data
//!   directory, and the backup only reads the files and opens the database as one more
//!   SQLite reader (SQLite's own locking keeps that safe). The relay needs no API for it,
//!   so a backup also works on a stopped relay, and needs no admin token.
//! - With a PostgreSQL store the backup holds the files only: the database is the
//!   operator's to dump (`pg_dump`), which this says, rather than running a `pg_dump`
//!   whose version may not match the server's.
//! - A restore writes into an empty (or new) directory only, so nothing of another relay
//!   is ever overwritten, and checks the restored database (`PRAGMA integrity_check`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use crate::state::data_dir::io_failure;
use crate::state::pki::{ensure_private_dir, files, write_secret};

/// The manifest's file name inside a backup.
pub const MANIFEST: &str = "backup.json";
/// This layout's version (a newer one is refused by an older `sluice restore`).
pub const FORMAT: u32 = 1;
/// The data directory's files a backup carries; the first three must be there.
pub const IDENTITY_FILES: [&str; 4] = [files::CA_CERT, files::CA_KEY, files::JWT_KEY, files::ADMIN_TOKEN];
/// The tables whose rows a backup counts (what an operator checks after a restore).
const COUNTED: [&str; 6] = ["customers", "resources", "agents", "registration_tokens", "api_tokens", "leases"];

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The `sluice` version that made it.
    pub sluice_version: String,
    /// Unix time it was made.
    pub created_at: u64,
    /// `sqlite` (the store is `sluice.db` in the backup) or `postgres` (files only).
    pub store: String,
    /// The identity files in the backup.
    pub files: Vec<String>,
    /// Rows per table in the copied store (SQLite only).
    #[serde(default)]
    pub rows: BTreeMap<String, u64>,
}

/// Where a relay keeps its store: the SQLite file, or a PostgreSQL URL.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    Postgres(String),
}

impl StoreLocation {
    /// As `sluice serve` decides it from `--data-dir` and `--database-url`.
    pub fn of(data_dir: &Path, database_url: Option<&str>) -> StoreLocation {
        match database_url.map(str::trim).filter(|u| !u.is_empty()) {
            None => StoreLocation::Sqlite(data_dir.join(files::DATABASE)),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                StoreLocation::Postgres(u.to_owned())
            }
            Some(u) => StoreLocation::Sqlite(PathBuf::from(u.strip_prefix("sqlite://").unwrap_or(u))),
        }
    }
}

/// Refuses a destination that exists and is not empty, naming what is in it.
pub fn require_empty(dir: &Path, what: &str, fix: &str) -> Result<()> {
    match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_failure("read", dir, &e)),
        Ok(entries) => {
            let mut names: Vec<String> =
                entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            if names.is_empty() {
                return Ok(());
            }
            names.sort();
            let shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
            bail!(
                "{} is not empty ({} entr{}: {shown}{}): {what} goes only into an empty or new directory, so nothing \
                 in it is overwritten; {fix}",
                dir.display(),
                names.len(),
                if names.len() == 1 { "y" } else { "ies" },
                if names.len() > 5 { ", …" } else { "" }
            )
        }
    }
}

/// Copies `source` (a live SQLite database, WAL mode or not) to `dest` with the online
/// backup API in one step: one consistent snapshot. Returns the rows per counted table.
pub fn copy_database(source: &Path, dest: &Path) -> Result<BTreeMap<String, u64>> {
    if !source.exists() {
        bail!(
            "the database {} does not exist: is --data-dir the relay's data directory? (with a PostgreSQL store pass \
             its --database-url, SLUICE_DATABASE_URL)",
            source.display()
        );
    }
    // Read-write but never created: a reader of a WAL database needs its -shm file.
    let src = Connection::open_with_flags(source, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .with_context(|| format!("opening the database {}", source.display()))?;
    src.busy_timeout(Duration::from_secs(30))?;
    let tmp = dest.with_extension("db.partial");
    let _ = fs::remove_file(&tmp);
    {
        let mut dst = Connection::open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        use rusqlite::backup::StepResult;
        let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
        // -1: every page in one step, under one read transaction — one snapshot (in
        // steps, a write between two of them would restart the copy).
        let copying = || format!("copying {} with SQLite's online backup", source.display());
        let started = std::time::Instant::now();
        loop {
            match backup.step(-1).with_context(copying)? {
                StepResult::Done => break,
                StepResult::More => continue,
                // Busy/Locked: another connection holds a lock that blocks reading.
                _ if started.elapsed() > Duration::from_secs(60) => {
                    bail!("{}: the database stayed locked for 60 s; try again", copying())
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    private_file(&tmp)?;
    let rows = check_database(&tmp)?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io_failure("write", &tmp, &e))?;
    fs::rename(&tmp, dest).map_err(|e| io_failure("write", dest, &e))?;
    Ok(rows)
}

/// Runs `PRAGMA integrity_check` on a database file and counts its rows per table.
pub fn check_database(path: &Path) -> Result<BTreeMap<String, u64>> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .with_context(|| format!("opening {}", path.display()))?;
    let verdict: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        bail!("{} fails SQLite's integrity check: {verdict}", path.display());
    }
    let mut rows = BTreeMap::new();
    for table in COUNTED {
        // A table an older schema lacks is counted as absent, not as an error.
        if let Ok(n) = c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get::<_, i64>(0)) {
            rows.insert(table.to_owned(), n as u64);
        }
    }
    Ok(rows)
}

fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|e| io_failure("make private", path, &e))
}

/// Makes a backup of the relay whose data directory is `data_dir` (running or not) in
/// `dest` (created; must be empty if it exists).
pub fn backup(data_dir: &Path, store: &StoreLocation, dest: &Path) -> Result<Manifest> {
    if !data_dir.join(files::CA_CERT).exists() {
        bail!(
            "{} holds no relay CA ({}): it is not a relay's data directory; pass the relay's --data-dir \
             (SLUICE_DATA_DIR)",
            data_dir.display(),
            files::CA_CERT
        );
    }
    require_empty(dest, "a backup", "choose a new backup path")?;
    ensure_private_dir(dest)?;
    let mut copied = Vec::new();
    for (i, name) in IDENTITY_FILES.iter().enumerate() {
        let from = data_dir.join(name);
        match fs::read(&from) {
            Ok(bytes) => {
                write_secret(&dest.join(name), &bytes)?;
                copied.push((*name).to_owned());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && i == 3 => {}
            Err(e) => return Err(io_failure("read", &from, &e)),
        }
    }
    let (kind, rows) = match store {
        StoreLocation::Sqlite(db) => ("sqlite", copy_database(db, &dest.join(files::DATABASE))?),
        StoreLocation::Postgres(_) => ("postgres", BTreeMap::new()),
    };
    let manifest = Manifest {
        format: FORMAT,
        sluice_version: crate::VERSION.to_owned(),
        created_at: sluice_proto::identity::unix_now(),
        store: kind.to_owned(),
        files: copied,
        rows,
    };
    write_secret(&dest.join(MANIFEST), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    Ok(manifest)
}

/// Reads a backup's manifest, refusing what is not a backup or is of a newer format.
pub fn read_manifest(backup: &Path) -> Result<Manifest> {
    let path = backup.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(|e| {
        anyhow!(
            "{} is not a sluice backup ({e} reading {}); pass the directory `sluice backup` wrote",
            backup.display(),
            path.display()
        )
    })?;
    let m: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{} is not a valid backup manifest", path.display()))?;
    if m.format > FORMAT {
        bail!(
            "{} was made by a newer sluice ({}, backup format {}); this one ({}) reads format {FORMAT}: restore with \
             that version or newer",
            backup.display(),
            m.sluice_version,
            m.format,
            crate::VERSION
        );
    }
    Ok(m)
}

/// Restores `backup` into `data_dir` (created; must be empty if it exists). Returns the
/// manifest and, for a SQLite store, the restored database's rows per table.
pub fn restore(backup: &Path, data_dir: &Path) -> Result<(Manifest, Option<BTreeMap<String, u64>>)> {
    let manifest = read_manifest(backup)?;
    require_empty(
        data_dir,
        "a restore",
        "restore into a new --data-dir (then start the relay on it), or empty this one if it is really not needed",
    )?;
    ensure_private_dir(data_dir)?;
    for name in &manifest.files {
        if !IDENTITY_FILES.contains(&name.as_str()) {
            bail!("the backup's manifest names an unexpected file {name:?}; it was altered");
        }
        let from = backup.join(name);
        let bytes = fs::read(&from).map_err(|e| io_failure("read", &from, &e))?;
        write_secret(&data_dir.join(name), &bytes)?;
    }
    if manifest.store != "sqlite" {
        return Ok((manifest, None));
    }
    let (from, to) = (backup.join(files::DATABASE), data_dir.join(files::DATABASE));
    let tmp = to.with_extension("db.partial");
    fs::copy(&from, &tmp).map_err(|e| io_failure("copy", &from, &e))?;
    private_file(&tmp)?;
    let rows = check_database(&tmp)?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io_failure("write", &tmp, &e))?;
    fs::rename(&tmp, &to).map_err(|e| io_failure("write", &to, &e))?;
    Ok((manifest, Some(rows)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::state::store::{SqliteStore, Store};

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_backup_of_a_live_store_restores_into_an_empty_directory_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        crate::state::pki::RelayIdentity::load_or_create(&data, &["localhost".to_owned()]).unwrap();
        let store = SqliteStore::open(&data.join(files::DATABASE)).unwrap();
        for i in 0..20 {
            store.create_customer(&format!("cus_{i}"), &format!("c{i}"), 1).unwrap();
        }
        // The store stays open (a running relay): its last writes are in the -wal file.
        let dest = dir.path().join("backup");
        let m = backup(&data, &StoreLocation::of(&data, None), &dest).unwrap();
        assert_eq!(m.store, "sqlite");
        assert_eq!(m.rows["customers"], 20);
        assert_eq!(m.files.len(), 4);
        assert_eq!(mode(&dest), 0o700);
        for f in ["ca.key", "admin-token", "sluice.db", MANIFEST] {
            assert_eq!(mode(&dest.join(f)), 0o600, "{f}");
        }
        let err = backup(&data, &StoreLocation::of(&data, None), &dest).unwrap_err().to_string();
        assert!(err.contains("is not empty") && err.contains("new backup path"), "{err}");

        let err = restore(&dest, &data).unwrap_err().to_string();
        assert!(err.contains("is not empty") && err.contains("new --data-dir"), "{err}");
        let fresh = dir.path().join("fresh");
        let (_, rows) = restore(&dest, &fresh).unwrap();
        assert_eq!(rows.unwrap()["customers"], 20);
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(fs::read(fresh.join("ca.key")).unwrap(), fs::read(data.join("ca.key")).unwrap());
        let restored = SqliteStore::open(&fresh.join(files::DATABASE)).unwrap();
        assert_eq!(restored.customers().unwrap().len(), 20);
    }

    #[test]
    fn postgres_backups_hold_the_files_and_what_is_not_a_backup_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        crate::state::pki::RelayIdentity::load_or_create(&data, &["localhost".to_owned()]).unwrap();
        let pg = StoreLocation::of(&data, Some("postgres://u:p@h/db"));
        assert_eq!(pg, StoreLocation::Postgres("postgres://u:p@h/db".into()));
        let m = backup(&data, &pg, &dir.path().join("b")).unwrap();
        assert_eq!(m.store, "postgres");
        assert!(!dir.path().join("b").join(files::DATABASE).exists());
        let err = read_manifest(&data).unwrap_err().to_string();
        assert!(err.contains("is not a sluice backup"), "{err}");
        let err = backup(dir.path(), &pg, &dir.path().join("c")).unwrap_err().to_string();
        assert!(err.contains("not a relay's data directory"), "{err}");
    }
}
