//! Prometheus metrics of the agent, served only when asked for (`--metrics-listen`, e.g.
//! `127.0.0.1:9464`): the agent opens no port by default.
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

use sluice_proto::metrics::PrometheusHandle;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    let handle = sluice_proto::metrics::install();
    // Present from the start, so "0 bytes copied" is visible before any stream ends.
    metrics::counter!("sluice_agent_userspace_copy_bytes_total").increment(0);
    handle
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

pub fn session(up: bool) {
    metrics::gauge!("sluice_agent_sessions").set(if up { 1.0 } else { 0.0 });
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

pub fn pool(ebpf_map_entries: usize, idle_data_connections: u32) {
    metrics::gauge!("sluice_agent_ebpf_map_entries").set(ebpf_map_entries as f64);
    metrics::gauge!("sluice_agent_idle_data_connections").set(idle_data_connections as f64);
}

/// Serves `GET /metrics` on `addr` (a deliberately tiny HTTP/1.1 responder: one
/// request per connection, no dependencies beyond tokio).
pub async fn serve(addr: SocketAddr, handle: PrometheusHandle) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => return warn!(%addr, error = %e, "cannot open the metrics listener; metrics stay off"),
    };
    info!(%addr, "metrics at http://{addr}/metrics");
    while let Ok((mut s, _)) = listener.accept().await {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 1024];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut req)).await;
            let Ok(Ok(n)) = n else { return };
            let line = String::from_utf8_lossy(&req[..n]);
            let (status, body) = if line.starts_with("GET /metrics ") {
                ("200 OK", handle.render())
            } else {
                ("404 Not Found", "only GET /metrics is served here\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
