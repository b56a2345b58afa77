//! Notices the database failing under the running relay, instead of at the next start.
//!
//! Every [`CHECK_EVERY`] the watch asks the store's [`Store::check`] whether it still
//! answers. SQLite keeps using a file that was deleted (the open descriptor keeps the
//! inode alive): admin calls and enrollments go on working, and everything is lost when
//! the relay stops — a supervisor's restart then finds no database at all; so its check
//! also asks whether the file at the path is still the one the relay opened. PostgreSQL's
//! check is a `SELECT 1` (reconnecting if the connection dropped). A failure is loud: an
//! error in the log naming the file or the server (repeated every [`REPEAT_EVERY`] while
//! it lasts), `/readyz` 503 with the reason, `sluice_relay_store_fault` 1, and what the
//! engine can save ([`Store::rescue`]: SQLite writes a copy of the open database next to
//! it, `sluice.db.recovered-<unix time>`, to restore from). Recovery is logged once.
//!
//! The relay does not exit: its sessions and streams keep running, and a restart
//! would lose what the open file still holds. It refuses to start on a data directory
//! that has a CA but no database ([`crate::state::data_dir::refuse_missing_database`]),
//! so a supervisor cannot turn the loss into an empty database either.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::state::store::Store;

/// How often the database file is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How often a lasting fault is logged again.
pub const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// The store's health as the last check saw it; read by `/readyz`.
#[derive(Debug, Default)]
pub struct StoreHealth {
    fault: Mutex<Option<String>>,
}

impl StoreHealth {
    /// What is wrong with the database, if anything.
    pub fn fault(&self) -> Option<String> {
        self.fault.lock().clone()
    }
}

/// What one check means for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// Nothing to say.
    Quiet,
    /// A fault, new (`first`) or repeated after [`REPEAT_EVERY`].
    Fault { message: String, first: bool },
    /// The store answers again after a fault.
    Recovered,
}

/// The watch's memory between checks, without I/O or clock of its own.
#[derive(Debug, Default)]
struct Watch {
    /// The fault last reported, and when.
    reported: Option<(String, Instant)>,
}

impl Watch {
    fn observe(&mut self, check: Result<(), String>, now: Instant) -> Verdict {
        match (check, &self.reported) {
            (Ok(()), None) => Verdict::Quiet,
            (Ok(()), Some(_)) => {
                self.reported = None;
                Verdict::Recovered
            }
            (Err(m), Some((last, at))) if *last == m && now.duration_since(*at) < REPEAT_EVERY => Verdict::Quiet,
            (Err(m), reported) => {
                let first = reported.as_ref().is_none_or(|(last, _)| *last != m);
                self.reported = Some((m.clone(), now));
                Verdict::Fault { message: m, first }
            }
        }
    }
}

/// Checks the database every [`CHECK_EVERY`] until `shutdown`, reporting to `health`, the
/// log and the metrics.
pub async fn run(store: Arc<dyn Store>, health: Arc<StoreHealth>, shutdown: CancellationToken) {
    let mut watch = Watch::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        // A PostgreSQL check may wait on the network (up to its connect timeout).
        let check = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.check()).await.unwrap_or_else(|e| Err(e.to_string()))
        };
        let fault = check.as_ref().err().cloned();
        let verdict = watch.observe(check, Instant::now());
        // A recovery is logged before /readyz turns 200, so whoever sees it finds the line.
        if verdict == Verdict::Recovered {
            info!(store = %store.location(), "the database answers again");
        }
        crate::metrics::store_fault(fault.is_some());
        *health.fault.lock() = fault;
        match verdict {
            Verdict::Quiet | Verdict::Recovered => {}
            Verdict::Fault { message, first } => {
                let mut saved = if first {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || store.rescue()).await.unwrap_or_default()
                } else {
                    String::new()
                };
                if !saved.is_empty() {
                    saved.insert(0, ' ');
                }
                error!(store = %store.location(), "{message}. /readyz answers 503 until this is fixed.{saved}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::SqliteStore;

    #[test]
    fn faults_are_reported_at_once_then_every_minute_and_recovery_once() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        let gone = || Err::<(), _>("gone".to_owned());
        assert_eq!(w.observe(Ok(()), t0), Verdict::Quiet);
        assert_eq!(w.observe(gone(), t0), Verdict::Fault { message: "gone".into(), first: true });
        assert_eq!(w.observe(gone(), t0 + CHECK_EVERY), Verdict::Quiet);
        assert_eq!(w.observe(gone(), t0 + REPEAT_EVERY), Verdict::Fault { message: "gone".into(), first: false });
        let other = w.observe(Err("full".into()), t0 + REPEAT_EVERY + CHECK_EVERY);
        assert_eq!(other, Verdict::Fault { message: "full".into(), first: true }, "a new fault is news");
        assert_eq!(w.observe(Ok(()), t0 + REPEAT_EVERY * 2), Verdict::Recovered);
        assert_eq!(w.observe(Ok(()), t0 + REPEAT_EVERY * 3), Verdict::Quiet);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_database_is_reported_and_a_copy_saved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.db");
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        store.create_customer("c1", "acme", 1).unwrap();
        let health = Arc::new(StoreHealth::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(store.clone() as Arc<dyn Store>, health.clone(), stop.clone()));
        tokio::time::sleep(CHECK_EVERY + Duration::from_millis(10)).await;
        assert_eq!(health.fault(), None);
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(CHECK_EVERY).await;
        let fault = health.fault().expect("the deletion is noticed");
        assert!(fault.contains(&path.display().to_string()), "{fault}");
        let copies: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("sluice.db.recovered-"))
            .collect();
        assert_eq!(copies.len(), 1, "one copy saved");
        assert_eq!(SqliteStore::open(&copies[0].path()).unwrap().customers().unwrap().len(), 1);
        stop.cancel();
        task.await.unwrap();
    }
}
