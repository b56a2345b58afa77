//! Prometheus metrics of the relay, served at `/metrics` on the admin listener.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sluice_relay_bytes_total` | counter | `resource`, `direction` (`in`: client → service, `out`) |
//! | `sluice_relay_streams_opened_total` | counter | `resource`, `path` (`ktls_splice`, `userspace`, …) |
//! | `sluice_relay_userspace_copy_bytes_total` | counter | | payload bytes copied through user space |
//! | `sluice_relay_streams_closed_total` | counter | `resource`, `end` (`clean`, `aborted`, `cancelled`) |
//! | `sluice_relay_streams_failed_total` | counter | `resource`, `reason` (`no_agent`, `refused`, `timeout`, `stale`, `ktls`) |
//! | `sluice_relay_streams_active` | gauge | `resource` |
//! | `sluice_relay_agent_sessions` | gauge | `resource` |
//! | `sluice_relay_handshake_failures_total` | counter | |
//! | `sluice_relay_enrollments_total` | counter | `outcome` (`enrolled` or a rejection code) |

use sluice_proto::metrics::PrometheusHandle;

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    let handle = sluice_proto::metrics::install();
    // Present from the start, so "0 bytes copied" is visible before any stream ends.
    metrics::counter!("sluice_relay_userspace_copy_bytes_total").increment(0);
    handle
}

pub fn bytes(resource: &str, bytes_in: u64, bytes_out: u64) {
    if bytes_in > 0 {
        metrics::counter!("sluice_relay_bytes_total", "resource" => resource.to_owned(), "direction" => "in")
            .increment(bytes_in);
    }
    if bytes_out > 0 {
        metrics::counter!("sluice_relay_bytes_total", "resource" => resource.to_owned(), "direction" => "out")
            .increment(bytes_out);
    }
}

pub fn stream_opened(resource: &str, path: &'static str) {
    metrics::counter!("sluice_relay_streams_opened_total", "resource" => resource.to_owned(), "path" => path)
        .increment(1);
    metrics::gauge!("sluice_relay_streams_active", "resource" => resource.to_owned()).increment(1.0);
}

pub fn stream_closed(resource: &str, end: &'static str) {
    metrics::counter!("sluice_relay_streams_closed_total", "resource" => resource.to_owned(), "end" => end)
        .increment(1);
    metrics::gauge!("sluice_relay_streams_active", "resource" => resource.to_owned()).decrement(1.0);
}

/// Payload bytes a finished stream passed through a user-space buffer (0 with splice).
pub fn userspace_copy(bytes: u64) {
    metrics::counter!("sluice_relay_userspace_copy_bytes_total").increment(bytes);
}

pub fn stream_failed(resource: &str, reason: &'static str) {
    metrics::counter!("sluice_relay_streams_failed_total", "resource" => resource.to_owned(), "reason" => reason)
        .increment(1);
}

pub fn agent_sessions(resource: &str, delta: f64) {
    metrics::gauge!("sluice_relay_agent_sessions", "resource" => resource.to_owned()).increment(delta);
}

pub fn handshake_failed() {
    metrics::counter!("sluice_relay_handshake_failures_total").increment(1);
}

pub fn enrollment(outcome: &'static str) {
    metrics::counter!("sluice_relay_enrollments_total", "outcome" => outcome).increment(1);
}
