//! The data directory as a thing that can fail: who owns it, and what to tell the
//! operator when a file in it cannot be written.
//!
//! - [`DataDirLock`]: one relay per data directory. Two relays on one directory would
//!   share a CA and a database and fight over `admin-url`, the file the CLI reads the
//!   admin address from; the second one refuses to start instead, naming the holder.
//! - [`io_failure`]: every file error the relay reports names the file, says what the
//!   system said, and what to do about it (free space, permissions, a read-only mount).
//! - [`refuse_missing_database`]: a data directory that has a CA but lost its
//!   database must not quietly come back with an empty one (every customer gone).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read, Seek, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};

/// The name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "lock";

/// What to do about an I/O error on a file of the data directory, by the error's kind.
pub fn io_hint(e: &std::io::Error, path: &Path) -> String {
    let dir = path.parent().unwrap_or(path).display();
    match e.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
            format!("free space on the volume holding {dir} (`df -h {dir}`), then start the relay again")
        }
        ErrorKind::PermissionDenied => {
            format!("the relay's user needs read and write access to {dir} (check its owner and mode)")
        }
        ErrorKind::ReadOnlyFilesystem => format!("{dir} is on a read-only file system: mount it read-write"),
        ErrorKind::NotFound => format!("{dir} is missing: check --data-dir and that its volume is mounted"),
        _ => format!("check the disk holding {dir} (`dmesg` shows I/O errors)"),
    }
}

/// "cannot write /x/sluice.db: No space left on device (os error 28) — free space on …":
/// the file, what the system said, and what to do.
pub fn io_failure(action: &str, path: &Path, e: &std::io::Error) -> anyhow::Error {
    anyhow!("cannot {action} {}: {e} — {}", path.display(), io_hint(e, path))
}

/// Holds an exclusive lock (`flock`) on `<data-dir>/lock` for the relay's life; the
/// kernel releases it when the process ends, however it ends, so a crashed relay never
/// leaves a stale lock behind. The file also says who holds it (pid, addresses), for the
/// message a second relay prints.
#[derive(Debug)]
pub struct DataDirLock {
    file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock on `dir` (which must exist), or explains who holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_failure("create the lock file", &path, &e))?;
        match file.try_lock() {
            Ok(()) => Ok(DataDirLock { file, path }),
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                Err(anyhow!("{}", held_message(dir, &holder)))
            }
            Err(TryLockError::Error(e)) => Err(io_failure("lock", &path, &e)),
        }
    }

    /// Records who holds the lock (this process and its listeners), for a second relay's
    /// message. Failing to write it is not fatal (the lock holds either way), only logged.
    pub fn record_holder(&mut self, agent: SocketAddr, admin: SocketAddr) {
        let text = format!("pid={}\nagent_listen={agent}\nadmin_listen={admin}\n", std::process::id());
        let written =
            self.file.set_len(0).and_then(|()| self.file.rewind()).and_then(|()| self.file.write_all(text.as_bytes()));
        if let Err(e) = written {
            tracing::warn!("{}", io_failure("write", &self.path, &e));
        }
    }
}

/// What a second relay on a locked data directory tells its operator.
fn held_message(dir: &Path, holder: &str) -> String {
    let field =
        |k: &str| holder.lines().find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('='))).map(str::trim);
    let who = match (field("pid"), field("agent_listen"), field("admin_listen")) {
        (Some(pid), Some(agent), Some(admin)) => {
            format!("another relay (pid {pid}, agent port {agent}, admin API {admin})")
        }
        (Some(pid), _, _) => format!("another relay (pid {pid})"),
        _ => "another relay".to_owned(),
    };
    format!(
        "the data directory {} is in use by {who}: two relays cannot share one data directory (its CA, database \
         and the admin-url file the CLI reads); stop the other relay first, or give this one its own --data-dir",
        dir.display()
    )
}

/// Refuses to start on a data directory that holds the relay's CA (so it served before)
/// but whose SQLite database is gone: opening it would create an empty database, and
/// every customer, resource and agent would be lost without a word.
pub fn refuse_missing_database(data_dir: &Path, database: &Path) -> anyhow::Error {
    let recovered = recovered_copies(database);
    let restore = if recovered.is_empty() {
        "restore it from a backup".to_owned()
    } else {
        format!(
            "restore it from a backup or from the copy the relay saved when it noticed the loss ({}: move it to {}, \
             after deleting {}-wal and {}-shm if present)",
            recovered.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            database.display(),
            database.display(),
            database.display()
        )
    };
    anyhow!(
        "the database {} is missing, but {} holds this relay's CA: it has served before, and starting would create \
         an EMPTY database (every customer, resource and agent gone; every agent refused). If the file was deleted \
         or moved, {restore} and start again. To start over with an empty database on purpose, start once with \
         --recreate-database (SLUICE_RECREATE_DATABASE=true)",
        database.display(),
        data_dir.display()
    )
}

/// Where the relay saves a copy of a database whose file was deleted under it.
pub fn recovered_copy_path(database: &Path, unix_secs: u64) -> PathBuf {
    let mut name = database.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".recovered-{unix_secs}"));
    database.with_file_name(name)
}

/// Copies saved by [`recovered_copy_path`] next to `database`, oldest first.
fn recovered_copies(database: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (database.parent(), database.file_name()) else { return Vec::new() };
    let prefix = format!("{}.recovered-", name.to_string_lossy());
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_directory_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = DataDirLock::acquire(dir.path()).unwrap();
        first.record_holder("127.0.0.1:8443".parse().unwrap(), "127.0.0.1:8080".parse().unwrap());
        let err = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(err.contains("127.0.0.1:8443") && err.contains("127.0.0.1:8080"), "{err}");
        assert!(err.contains("--data-dir"), "{err}");
        drop(first);
        DataDirLock::acquire(dir.path()).expect("free again once the holder is gone");
    }

    #[test]
    fn held_message_without_holder_details() {
        let m = held_message(Path::new("/d"), "");
        assert!(m.contains("/d is in use by another relay:"), "{m}");
        let m = held_message(Path::new("/d"), "pid=42\n");
        assert!(m.contains("another relay (pid 42)"), "{m}");
    }

    #[test]
    fn io_failures_name_the_file_and_the_fix() {
        let e = std::io::Error::from(ErrorKind::StorageFull);
        let m = io_failure("write", Path::new("/data/sluice.db"), &e).to_string();
        assert!(m.starts_with("cannot write /data/sluice.db: "), "{m}");
        assert!(m.contains("free space on the volume holding /data"), "{m}");
        let e = std::io::Error::from(ErrorKind::PermissionDenied);
        assert!(io_failure("create", Path::new("/d/x"), &e).to_string().contains("read and write access to /d"));
    }

    #[test]
    fn a_missing_database_names_the_way_out_and_the_saved_copy() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sluice.db");
        let m = refuse_missing_database(dir.path(), &db).to_string();
        assert!(m.contains(&db.display().to_string()) && m.contains("--recreate-database"), "{m}");
        assert!(m.contains("from a backup and start"), "{m}");
        let copy = recovered_copy_path(&db, 1700000000);
        assert_eq!(copy, dir.path().join("sluice.db.recovered-1700000000"));
        std::fs::write(&copy, "x").unwrap();
        let m = refuse_missing_database(dir.path(), &db).to_string();
        assert!(m.contains(&copy.display().to_string()), "{m}");
    }
}
