//! Prometheus metrics and health of the agent, served only when asked for
//! (`--metrics-listen`, e.g. `127.0.0.1:9464`): the agent opens no port by default.
//!
//! | path | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text; every metric has `# HELP` |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 while the control session with the relay is up; 503 with a JSON reason otherwise |
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sluice_agent_bytes_total` | counter | `direction` (`in`: to the private service, `out`) |
//! | `sluice_agent_streams_opened_total` | counter | `path` (`ktls_splice`, `userspace`, …) |
//! | `sluice_agent_userspace_copy_bytes_total` | counter | payload bytes copied through user space |
//! | `sluice_agent_streams_closed_total` | counter | `end` (`clean`, `aborted`, `cancelled`) |
//! | `sluice_agent_streams_failed_total` | counter | `reason` (`service_unreachable`, `ktls`) |
//! | `sluice_agent_streams_active` | gauge | |
//! | `sluice_agent_sessions` | gauge | (1 while the control session is up) |
//! | `sluice_agent_reconnects_total` | counter | |
//! | `sluice_agent_handshake_failures_total` | counter | |
//! | `sluice_agent_enrollments_total` | counter | `outcome` |
//! | `sluice_agent_ebpf_enabled` | gauge | 1 when stream bytes are counted by eBPF |
//! | `sluice_agent_ebpf_map_entries` | gauge | sockets registered with the eBPF program |
//! | `sluice_agent_idle_data_connections` | gauge | warm data connections waiting for a stream |
//! | `sluice_agent_data_pool_target` | gauge | warm data connections the agent keeps now (the relay's pool size at rest, more while streams arrive faster than it refills) |
//! | `sluice_agent_tls_key_updates_total` | counter | `direction` (`received`: a peer's TLS KeyUpdate followed by a kernel-TLS stream; `sent`: this end's answer) |
//! | `sluice_agent_build_info` | gauge | `version`, `commit` (always 1) |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use sluice_proto::metrics::PrometheusHandle;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// True while the control session with the relay is up: what `/readyz` answers.
/// Control sessions up (one per relay of the cluster the agent holds a session to).
static SESSIONS_UP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Why the agent last failed to reach the relay, for `/readyz` while it is down.
static LAST_FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// Installs the process-wide Prometheus recorder (once), describes every metric, and
/// returns the recorder's handle.
pub fn install() -> PrometheusHandle {
    let handle = sluice_proto::metrics::install();
    describe();
    metrics::gauge!("sluice_agent_build_info", "version" => crate::VERSION, "commit" => crate::GIT_COMMIT).set(1.0);
    // Present from the start, so "0 bytes copied" is visible before any stream ends.
    metrics::counter!("sluice_agent_userspace_copy_bytes_total").increment(0);
    handle
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        "sluice_agent_bytes_total",
        Unit::Bytes,
        "Stream payload bytes by direction (in: to the private service)."
    );
    describe_counter!("sluice_agent_streams_opened_total", "Streams opened, by data path.");
    describe_counter!(
        "sluice_agent_userspace_copy_bytes_total",
        Unit::Bytes,
        "Payload bytes of finished streams that passed through a user-space buffer (0 with kTLS + splice)."
    );
    describe_counter!("sluice_agent_streams_closed_total", "Streams closed, by how they ended.");
    describe_counter!("sluice_agent_streams_failed_total", "Streams that could not be opened, by reason.");
    describe_gauge!("sluice_agent_streams_active", "Streams open now.");
    describe_gauge!("sluice_agent_sessions", "1 while the control session with the relay is up.");
    describe_counter!("sluice_agent_reconnects_total", "Control sessions that ended other than by shutdown.");
    describe_counter!("sluice_agent_handshake_failures_total", "TLS handshakes with the relay that failed.");
    describe_counter!("sluice_agent_enrollments_total", "Enrollment attempts, by outcome.");
    describe_gauge!("sluice_agent_ebpf_enabled", "1 when stream bytes are counted by the eBPF program.");
    describe_gauge!("sluice_agent_ebpf_map_entries", "Sockets registered with the eBPF program.");
    describe_gauge!("sluice_agent_idle_data_connections", "Warm data connections waiting for a stream.");
    describe_gauge!(
        "sluice_agent_data_pool_target",
        "Warm data connections the agent keeps now: the relay's pool size at rest, more while the relay's pool runs dry."
    );
    describe_counter!(
        "sluice_agent_tls_key_updates_total",
        "TLS key updates followed by kernel-TLS streams: received from the relay, sent in answer."
    );
    describe_gauge!("sluice_agent_build_info", "The running agent's version and git commit (always 1).");
}

pub fn bytes(bytes_in: u64, bytes_out: u64) {
    if bytes_in > 0 {
        metrics::counter!("sluice_agent_bytes_total", "direction" => "in").increment(bytes_in);
    }
    if bytes_out > 0 {
        metrics::counter!("sluice_agent_bytes_total", "direction" => "out").increment(bytes_out);
    }
}

pub fn stream_opened(path: &'static str) {
    metrics::counter!("sluice_agent_streams_opened_total", "path" => path).increment(1);
    metrics::gauge!("sluice_agent_streams_active").increment(1.0);
}

pub fn stream_closed(end: &'static str) {
    metrics::counter!("sluice_agent_streams_closed_total", "end" => end).increment(1);
    metrics::gauge!("sluice_agent_streams_active").decrement(1.0);
}

/// Payload bytes a finished stream passed through a user-space buffer (0 with splice).
pub fn userspace_copy(bytes: u64) {
    metrics::counter!("sluice_agent_userspace_copy_bytes_total").increment(bytes);
}

pub fn stream_failed(reason: &'static str) {
    metrics::counter!("sluice_agent_streams_failed_total", "reason" => reason).increment(1);
}

/// A control session came up or ended: the gauge (sessions up, one per relay) and
/// `/readyz` (ready while any is up) follow it.
pub fn session(up: bool) {
    let n = if up {
        *LAST_FAILURE.lock() = None;
        SESSIONS_UP.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        SESSIONS_UP.fetch_sub(1, Ordering::Relaxed).saturating_sub(1)
    };
    metrics::gauge!("sluice_agent_sessions").set(n as f64);
    systemd(sluice_runtime::sd_notify::status(&match n {
        0 => "no control session with the relay: reconnecting".to_owned(),
        n => format!("connected: {n} control session(s) with the relay"),
    }));
}

/// Remembers why the relay could not be reached, for `/readyz` to say.
pub fn relay_unreachable(why: &str) {
    *LAST_FAILURE.lock() = Some(why.to_owned());
    systemd(sluice_runtime::sd_notify::status(&format!("relay unreachable: {why}; retrying")));
}

/// Tells systemd (`Type=notify`) the agent is ready: started with a valid configuration
/// and, when asked for, its metrics and health listener bound. Being connected is not
/// part of it (the agent keeps retrying on its own; a start timeout would only restart
/// it): the status line and `/readyz` say whether the relay answers.
pub fn started() {
    systemd(sluice_runtime::sd_notify::ready("started: connecting to the relay"));
}

/// Reports a notification systemd did not get (`$NOTIFY_SOCKET` set but unreachable).
pub fn systemd(sent: std::io::Result<bool>) {
    if let Err(e) = sent {
        warn!(error = %e, "cannot notify systemd ($NOTIFY_SOCKET); with Type=notify it waits until TimeoutStartSec");
    }
}

pub fn reconnect() {
    metrics::counter!("sluice_agent_reconnects_total").increment(1);
}

pub fn handshake_failed() {
    metrics::counter!("sluice_agent_handshake_failures_total").increment(1);
}

pub fn enrollment(outcome: &'static str) {
    metrics::counter!("sluice_agent_enrollments_total", "outcome" => outcome).increment(1);
}

pub fn ebpf_enabled(on: bool) {
    metrics::gauge!("sluice_agent_ebpf_enabled").set(if on { 1.0 } else { 0.0 });
}

pub fn pool(ebpf_map_entries: usize, idle_data_connections: u32, target: u32) {
    metrics::gauge!("sluice_agent_ebpf_map_entries").set(ebpf_map_entries as f64);
    metrics::gauge!("sluice_agent_idle_data_connections").set(idle_data_connections as f64);
    metrics::gauge!("sluice_agent_data_pool_target").set(target as f64);
}

/// Copies the data path's key-update counts into their counters (before each scrape).
fn key_updates() {
    let (received, sent) = sluice_datapath::key_updates();
    metrics::counter!("sluice_agent_tls_key_updates_total", "direction" => "received").absolute(received);
    metrics::counter!("sluice_agent_tls_key_updates_total", "direction" => "sent").absolute(sent);
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` with hyper (HTTP/1.1).
pub async fn serve(addr: SocketAddr, handle: PrometheusHandle) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            started();
            return warn!(%addr, error = %e, "cannot open the metrics listener (--metrics-listen); metrics and health \
                checks stay off until the agent restarts with a free address");
        }
    };
    started();
    info!(%addr, "metrics at http://{addr}/metrics, health at /healthz and /readyz");
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(answer(&req, &handle)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(std::time::Duration::from_secs(5))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn answer(req: &Request<Incoming>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; version=0.0.4";
    const JSON: &str = "application/json";
    let (status, kind, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            key_updates();
            (StatusCode::OK, TEXT, handle.render())
        }
        (&Method::GET, "/healthz") => (StatusCode::OK, JSON, r#"{"status":"ok"}"#.to_owned()),
        (&Method::GET, "/readyz") => {
            let (status, body) = readiness(SESSIONS_UP.load(Ordering::Relaxed) > 0, LAST_FAILURE.lock().as_deref());
            (status, JSON, body.to_string())
        }
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: this listener serves GET /metrics, /healthz and /readyz\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
    resp
}

/// `/readyz`: ready exactly while the control session is up.
fn readiness(session_up: bool, last_failure: Option<&str>) -> (StatusCode, serde_json::Value) {
    if session_up {
        return (StatusCode::OK, serde_json::json!({ "status": "ready" }));
    }
    let reason = match last_failure {
        Some(why) => format!("no control session with the relay: {why}; the agent keeps retrying (see its log)"),
        None => "no control session with the relay yet: the agent is connecting (see its log)".to_owned(),
    };
    (StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "status": "not_ready", "reason": reason }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_the_session_is_up() {
        assert_eq!(readiness(true, None).0, StatusCode::OK);
        assert_eq!(readiness(true, Some("old failure")).0, StatusCode::OK);
        let (status, body) = readiness(false, None);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["reason"].as_str().unwrap().contains("connecting"), "{body}");
        let (status, body) = readiness(false, Some("connection refused"));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body["reason"].as_str().unwrap().contains("connection refused"), "{body}");
    }
}
