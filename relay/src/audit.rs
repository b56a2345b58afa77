//! The audit trail: who did what on the admin API, and every stream through a
//! resource port, appended to the store (both engines) and, with `--audit-log PATH`,
//! written as JSON lines to a file (`-`: stdout).
//!
//! - Admin actions are written as the request ends, by the admin API's token check
//!   ([`crate::admin::api`]): on a blocking thread, awaited, so the record is in the
//!   store when the answer leaves.
//! - Stream records come from the stream path ([`crate::data::resource_port`]), which
//!   must never wait for the store: [`Audit::stream`] puts the record on a bounded queue
//!   ([`QUEUE`]) that a writer thread drains; when the queue is full the record is
//!   dropped, counted (`sluice_relay_audit_dropped_total`) and warned about.
//! - Retention: [`run_retention`] deletes records older than `--audit-retention`, at
//!   start and every hour.
//!
//! Records hold ids, roles, addresses, counts and outcomes — never a token, JWT, key or
//! CSR: no request or response body is ever recorded.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admission::Throttle;
use crate::state::store::{AdminActionRecord, AuditEvent, AuditRecord, Store, StreamRecord};

/// Stream records waiting for the writer thread; beyond it they are dropped.
pub const QUEUE: usize = 4096;
/// At most this many queued stream records go to the store in one transaction.
const BATCH: usize = 256;
/// How long the writer lets stream records gather after the first one arrives.
const GATHER: Duration = Duration::from_millis(5);
/// How often retention runs.
pub const RETENTION_EVERY: Duration = Duration::from_secs(3600);

static DROPS: Throttle = Throttle::new(crate::admission::LOG_EVERY);

/// Where audit lines go besides the store.
type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// The relay's audit trail.
pub struct Audit {
    relay_id: String,
    store: Arc<dyn Store>,
    sink: Option<Sink>,
    queue: SyncSender<AuditRecord>,
}

/// Now, in ms since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Audit {
    /// Opens the sink (`-` for stdout; a file is created 0600 and appended to) and starts
    /// the writer thread.
    pub fn start(store: Arc<dyn Store>, relay_id: &str, sink: Option<&Path>) -> Result<Audit> {
        let sink: Option<Sink> = match sink {
            None => None,
            Some(p) if p == Path::new("-") => Some(Arc::new(Mutex::new(Box::new(std::io::stdout())))),
            Some(p) => Some(Arc::new(Mutex::new(Box::new(open_sink(p)?)))),
        };
        let (queue, records) = sync_channel::<AuditRecord>(QUEUE);
        let (store2, sink2) = (store.clone(), sink.clone());
        std::thread::Builder::new()
            .name("sluice-audit".into())
            .spawn(move || {
                // The writer wakes for the first record, lets others gather for
                // [`GATHER`], and stores them in one transaction: under churn that is
                // one wake-up and one commit per batch, not per stream (measured: the
                // thread's wake-ups were most of its CPU).
                while let Ok(first) = records.recv() {
                    std::thread::sleep(GATHER);
                    let mut batch = vec![first];
                    batch.extend(records.try_iter().take(BATCH - 1));
                    write_batch(&*store2, sink2.as_ref(), &batch);
                }
            })
            .context("starting the audit writer thread")?;
        Ok(Audit { relay_id: relay_id.to_owned(), store, sink, queue })
    }

    fn record(&self, at_ms: u64, event: AuditEvent) -> AuditRecord {
        AuditRecord { id: crate::data::agent_port::new_id("aud"), at_ms, relay_id: self.relay_id.clone(), event }
    }

    /// Records an admin action, in the store before it returns (on a blocking thread).
    pub async fn admin(&self, action: AdminActionRecord) {
        let r = self.record(now_ms(), AuditEvent::Admin(action));
        let (store, sink) = (self.store.clone(), self.sink.clone());
        let _ = tokio::task::spawn_blocking(move || write(&*store, sink.as_ref(), &r)).await;
    }

    /// Records a stream at its end without ever waiting: a full queue drops the record,
    /// counts it and warns.
    pub fn stream(&self, s: StreamRecord) {
        let r = self.record(s.ended_at_ms, AuditEvent::Stream(s));
        match self.queue.try_send(r) {
            Ok(()) => {}
            Err(TrySendError::Full(r)) => {
                crate::metrics::audit_dropped();
                if let Some(held_back) = DROPS.due() {
                    warn!(
                        record = %r.id, held_back,
                        "stream audit record dropped: the audit writer's queue ({QUEUE}) is full, the store or the \
                         --audit-log sink is slower than the streams end; see sluice_relay_audit_dropped_total and \
                         the store's health"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => crate::metrics::audit_dropped(),
        }
    }
}

/// Opens (creating 0600) the audit file for appending.
fn open_sink(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).with_context(|| {
        format!(
            "--audit-log {}: cannot open it for appending; check that its directory exists and is writable",
            path.display()
        )
    })
}

/// Writes one record to the store and the sink; failures are logged, never fatal.
fn write(store: &dyn Store, sink: Option<&Sink>, r: &AuditRecord) {
    if let Err(e) = store.append_audit(r) {
        warn!(record = %r.id, kind = r.kind(), error = %e, "audit record not stored (it still goes to --audit-log if set)");
    }
    write_sink(sink, std::slice::from_ref(r));
}

/// Writes stream records to the store in one transaction and to the sink; failures are
/// logged, never fatal.
fn write_batch(store: &dyn Store, sink: Option<&Sink>, rs: &[AuditRecord]) {
    if let Err(e) = store.append_audits(rs) {
        warn!(records = rs.len(), first = %rs[0].id, error = %e,
              "audit records not stored (they still go to --audit-log if set)");
    }
    write_sink(sink, rs);
}

fn write_sink(sink: Option<&Sink>, rs: &[AuditRecord]) {
    let Some(sink) = sink else { return };
    let mut out = sink.lock();
    for r in rs {
        let line = serde_json::to_string(r).expect("an audit record serializes");
        if let Err(e) = writeln!(out, "{line}") {
            warn!(record = %r.id, error = %e, "audit record not written to --audit-log: check its volume");
            return;
        }
    }
    if let Err(e) = out.flush() {
        warn!(error = %e, "audit records not written to --audit-log: check its volume");
    }
}

/// Deletes audit records older than `retention`, now and every [`RETENTION_EVERY`].
pub async fn run_retention(store: Arc<dyn Store>, retention: Duration, shutdown: CancellationToken) {
    loop {
        let before = now_ms().saturating_sub(retention.as_millis() as u64);
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.forget_audit_before(before)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                info!(deleted = n, retention_secs = retention.as_secs(), "audit records past retention deleted")
            }
            Ok(Err(e)) => warn!(error = %e, "audit retention: deleting old records failed; it runs again in an hour"),
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(RETENTION_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// `--audit-log`: a path, or `-` for stdout.
pub fn parse_sink(s: &str) -> Result<PathBuf, String> {
    if s.trim().is_empty() {
        return Err("--audit-log needs a file path, or - for stdout".into());
    }
    Ok(PathBuf::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::{AuditQuery, SqliteStore};

    fn stream(n: u64) -> StreamRecord {
        StreamRecord {
            resource_id: "res_1".into(),
            resource_name: "db".into(),
            agent_id: "agt_1".into(),
            client_addr: "127.0.0.1:5000".into(),
            started_at_ms: n,
            ended_at_ms: n + 1,
            bytes_in: n,
            bytes_out: 2 * n,
            end: "clean".into(),
            end_detail: "clean".into(),
            path: "userspace".into(),
            lease_id: None,
        }
    }

    #[test]
    fn stream_records_reach_the_store_and_a_private_sink() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let sink = dir.path().join("audit.jsonl");
        let audit = Audit::start(store.clone(), "rly_1", Some(&sink)).unwrap();
        for n in 1..=3 {
            audit.stream(stream(n));
        }
        let q = AuditQuery { since_ms: 0, resource: Some("db".into()), limit: 10 };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while store.audit(&q).unwrap().len() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let got = store.audit(&q).unwrap();
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[2].event, AuditEvent::Stream(s) if s.bytes_out == 6));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&sink).unwrap().permissions().mode() & 0o777, 0o600);
        let lines = std::fs::read_to_string(&sink).unwrap();
        assert_eq!(lines.lines().count(), 3, "{lines}");
        assert!(lines.contains("\"kind\":\"stream\""), "{lines}");
    }
}
