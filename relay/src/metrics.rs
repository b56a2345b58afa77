//! Prometheus metrics of the relay, served at `/metrics` on the admin listener. Every
//! metric has `# HELP` text, registered by [`install`].
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sluice_relay_bytes_total` | counter | `resource`, `direction` (`in`: client → service, `out`) |
//! | `sluice_relay_streams_opened_total` | counter | `resource`, `path` (`ktls_splice`, `userspace`, …) |
//! | `sluice_relay_userspace_copy_bytes_total` | counter | | payload bytes copied through user space |
//! | `sluice_relay_streams_closed_total` | counter | `resource`, `end` (`clean`, `aborted`, `cancelled`) |
//! | `sluice_relay_streams_failed_total` | counter | `resource`, `reason` (`no_agent`, `refused`, `timeout`, `stale`, `ktls`, `limit`) |
//! | `sluice_relay_streams_active` | gauge | `resource` |
//! | `sluice_relay_agent_sessions` | gauge | `resource` |
//! | `sluice_relay_agent_stalls_total` | counter | `resource` (an agent answered neither a stream's open nor a ping in time) |
//! | `sluice_relay_streams_moved_total` | counter | `resource` (streams moved off a stalled agent before any client byte) |
//! | `sluice_relay_stream_probes_total` | counter | `resource` (pings sent because an agent had not answered a stream's open within half the deadline) |
//! | `sluice_relay_handshake_failures_total` | counter | |
//! | `sluice_relay_data_handshakes_total` | counter | `kind` (`full`, `resumed`: a data connection resumed with a session ticket) |
//! | `sluice_relay_data_reused_total` | counter | `resource` (data connections parked again after a framed stream's clean end, for the next stream) |
//! | `sluice_relay_first_bytes_with_open_total` | counter | `resource` (streams whose client's first bytes went with the open, before the agent's answer) |
//! | `sluice_relay_tls_key_updates_total` | counter | `direction` (`received`: an agent's TLS KeyUpdate followed by a kernel-TLS stream; `sent`: the relay's answer) |
//! | `sluice_relay_enrollments_total` | counter | `outcome` (`enrolled` or a rejection code) |
//! | `sluice_relay_resource_port_blocked` | gauge | `resource` (1 while an agent is connected but the port cannot be bound) |
//! | `sluice_relay_resource_port_bind_failures_total` | counter | `resource` |
//! | `sluice_relay_store_fault` | gauge | | 1 while the database file is deleted, replaced or failing (see `/readyz`) |
//! | `sluice_relay_store_errors_total` | counter | | store calls that failed on the database file (disk full, I/O, read-only) |
//! | `sluice_relay_draining` | gauge | | 1 while the relay drains after SIGTERM |
//! | `sluice_relay_connections_active` | gauge | `listener` (`admin`; `agent`: not yet authenticated; `resource`: streams) |
//! | `sluice_relay_connections_refused_total` | counter | `listener` (`admin`, `agent`): closed at once over the cap |
//! | `sluice_relay_accept_errors_total` | counter | `listener` (`admin`, `agent`, `resource`): e.g. out of file descriptors |
//! | `sluice_relay_lease_refused_total` | counter | `reason` (`source`, `expired`, `spent`, `ended`, `unavailable`, `leased_only`): connections reset by lease admission |
//! | `sluice_build_info` | gauge | `version`, `commit` (always 1) |
//! | `sluice_resource_info` | gauge | `resource`, `name`, `customer` (id or empty; always 1) |
//!
//! `sluice_resource_info` is rendered from the store on every scrape ([`resource_info`])
//! rather than kept in the recorder: the recorder cannot forget a series, and a deleted
//! resource must disappear from the list, not linger as a stale 1.

use sluice_proto::metrics::PrometheusHandle;

use crate::state::store::Resource;

/// Installs the process-wide Prometheus recorder (once), describes every metric, and
/// returns the recorder's handle.
pub fn install() -> PrometheusHandle {
    let handle = sluice_proto::metrics::install();
    describe();
    metrics::gauge!("sluice_build_info", "version" => crate::VERSION, "commit" => crate::GIT_COMMIT).set(1.0);
    // Present from the start, so "0 bytes copied" is visible before any stream ends.
    metrics::counter!("sluice_relay_userspace_copy_bytes_total").increment(0);
    metrics::counter!("sluice_relay_store_errors_total").increment(0);
    store_fault(false);
    for listener in ["admin", "agent"] {
        metrics::counter!("sluice_relay_connections_refused_total", "listener" => listener).increment(0);
    }
    handle
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        "sluice_relay_bytes_total",
        Unit::Bytes,
        "Stream payload bytes by resource and direction (in: client to service)."
    );
    describe_counter!("sluice_relay_streams_opened_total", "Streams opened, by resource and data path.");
    describe_counter!(
        "sluice_relay_audit_dropped_total",
        "Stream audit records dropped because the audit writer's queue was full (the store or sink is too slow)."
    );
    describe_counter!(
        "sluice_relay_lease_refused_total",
        "Connections reset by lease admission: outside the lease's source, lease expired, spent or ended, or on \
         the fixed port of a leased-only resource."
    );
    describe_counter!(
        "sluice_relay_userspace_copy_bytes_total",
        Unit::Bytes,
        "Payload bytes of finished streams that passed through a user-space buffer (0 with kTLS + splice)."
    );
    describe_counter!("sluice_relay_streams_closed_total", "Streams closed, by resource and how they ended.");
    describe_counter!(
        "sluice_relay_streams_failed_total",
        "Streams refused before any byte moved, by resource and reason."
    );
    describe_gauge!("sluice_relay_streams_active", "Streams open now, by resource.");
    describe_gauge!("sluice_relay_agent_sessions", "Agent control sessions up now, by resource.");
    describe_counter!(
        "sluice_relay_agent_stalls_total",
        "Agents marked stalled: they answered neither a new stream nor a ping within the stream-open deadline."
    );
    describe_counter!(
        "sluice_relay_streams_moved_total",
        "Streams moved from a stalled agent to another agent of the resource before any client byte was read."
    );
    describe_counter!(
        "sluice_relay_stream_probes_total",
        "Pings sent to an agent slow to answer a stream's open (half the stream-open deadline)."
    );
    describe_counter!("sluice_relay_handshake_failures_total", "Agent TLS handshakes refused or timed out.");
    describe_counter!(
        "sluice_relay_data_handshakes_total",
        "Data connection TLS handshakes, by kind (full, or resumed from a session ticket)."
    );
    describe_counter!(
        "sluice_relay_data_reused_total",
        "Data connections kept for the next stream after a framed stream ended cleanly (no new handshake)."
    );
    describe_counter!(
        "sluice_relay_first_bytes_with_open_total",
        "Streams whose client's first bytes went to the agent with the stream's open, before its answer."
    );
    describe_counter!(
        "sluice_relay_tls_key_updates_total",
        "TLS key updates followed by kernel-TLS streams: received from agents, sent in answer."
    );
    describe_counter!(
        "sluice_relay_enrollments_total",
        "Agent enrollments, by outcome (enrolled or a rejection code)."
    );
    describe_gauge!(
        "sluice_relay_resource_port_blocked",
        "1 while a resource has a connected agent but its port cannot be bound (see `sluice resources list --extended`)."
    );
    describe_counter!("sluice_relay_resource_port_bind_failures_total", "Failed attempts to bind a resource's port.");
    describe_gauge!(
        "sluice_relay_store_fault",
        "1 while the database file is deleted, replaced or failing (checked every 5 s; /readyz says why)."
    );
    describe_counter!(
        "sluice_relay_store_errors_total",
        "Store calls that failed on the database file (disk full, I/O error, read-only, deleted)."
    );
    describe_gauge!("sluice_relay_draining", "1 while the relay drains its streams after SIGTERM.");
    describe_gauge!(
        "sluice_relay_connections_active",
        "Connections held now, by listener (admin; agent: not yet authenticated; resource: streams)."
    );
    describe_counter!(
        "sluice_relay_connections_refused_total",
        "Connections closed at once because their listener was at its cap (--admin-max-connections, \
         --agent-max-handshakes)."
    );
    describe_counter!(
        "sluice_relay_accept_errors_total",
        "Failed accepts by listener (out of file descriptors, …); the listener backs off up to 1 s."
    );
    describe_gauge!("sluice_build_info", "The running relay's version and git commit (always 1).");
}

/// The `sluice_resource_info` family for `resources`, in Prometheus text format.
pub fn resource_info(resources: &[Resource]) -> String {
    let mut out = String::from(
        "# HELP sluice_resource_info Every resource: its id, display name and customer id (empty for org-level); always 1.\n\
         # TYPE sluice_resource_info gauge\n",
    );
    for r in resources {
        out.push_str(&format!(
            "sluice_resource_info{{resource=\"{}\",name=\"{}\",customer=\"{}\"}} 1\n",
            label_value(&r.id),
            label_value(&r.name),
            label_value(r.customer_id.as_deref().unwrap_or(""))
        ));
    }
    out
}

/// Escapes a label value for the Prometheus text format: backslash, double quote and
/// line feed; everything else (spaces, any Unicode) stays as it is.
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
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

/// An agent left a stream's open and a ping unanswered: marked stalled, its streams move.
pub fn agent_stalled(resource: &str) {
    metrics::counter!("sluice_relay_agent_stalls_total", "resource" => resource.to_owned()).increment(1);
}

/// A ping went to an agent that had not answered a stream's open within half the
/// stream-open deadline (answered opens send none).
pub fn stream_probe(resource: &str) {
    metrics::counter!("sluice_relay_stream_probes_total", "resource" => resource.to_owned()).increment(1);
}

/// A stream moved from a stalled agent to another before any client byte was read.
pub fn stream_moved(resource: &str) {
    metrics::counter!("sluice_relay_streams_moved_total", "resource" => resource.to_owned()).increment(1);
}

pub fn agent_sessions(resource: &str, delta: f64) {
    metrics::gauge!("sluice_relay_agent_sessions", "resource" => resource.to_owned()).increment(delta);
}

/// Copies the data path's key-update counts into their counters (before each scrape).
pub fn key_updates() {
    let (received, sent) = sluice_datapath::key_updates();
    metrics::counter!("sluice_relay_tls_key_updates_total", "direction" => "received").absolute(received);
    metrics::counter!("sluice_relay_tls_key_updates_total", "direction" => "sent").absolute(sent);
}

/// A data connection completed its TLS handshake, in full or resumed from a ticket.
pub fn data_handshake(kind: &'static str) {
    metrics::counter!("sluice_relay_data_handshakes_total", "kind" => kind).increment(1);
}

/// A framed stream's data connection went back to its session's pool.
/// A stream's first client bytes went with its `StreamOpen`.
pub fn first_bytes_with_open(resource: &str) {
    metrics::counter!("sluice_relay_first_bytes_with_open_total", "resource" => resource.to_owned()).increment(1);
}

pub fn data_reused(resource: &str) {
    metrics::counter!("sluice_relay_data_reused_total", "resource" => resource.to_owned()).increment(1);
}

pub fn handshake_failed() {
    metrics::counter!("sluice_relay_handshake_failures_total").increment(1);
}

pub fn enrollment(outcome: &'static str) {
    metrics::counter!("sluice_relay_enrollments_total", "outcome" => outcome).increment(1);
}

/// A resource's port could (`false`) or could not (`true`) be bound; the gauge is 0
/// again when the port is released with the resource's last agent.
pub fn port_blocked(resource: &str, blocked: bool) {
    metrics::gauge!("sluice_relay_resource_port_blocked", "resource" => resource.to_owned()).set(if blocked {
        1.0
    } else {
        0.0
    });
}

pub fn port_bind_failed(resource: &str) {
    metrics::counter!("sluice_relay_resource_port_bind_failures_total", "resource" => resource.to_owned()).increment(1);
}

/// Whether the database file check fails now.
pub fn store_fault(fault: bool) {
    metrics::gauge!("sluice_relay_store_fault").set(if fault { 1.0 } else { 0.0 });
}

/// A stream's audit record was dropped: the audit writer's queue was full.
pub fn audit_dropped() {
    metrics::counter!("sluice_relay_audit_dropped_total").increment(1);
}

/// A store call failed on the database file.
pub fn store_error() {
    metrics::counter!("sluice_relay_store_errors_total").increment(1);
}

/// Whether the relay is draining.
pub fn draining(on: bool) {
    metrics::gauge!("sluice_relay_draining").set(if on { 1.0 } else { 0.0 });
}

/// Connections a listener holds now (`delta` +1 when admitted, -1 when closed).
pub fn connections_active(listener: &'static str, delta: f64) {
    metrics::gauge!("sluice_relay_connections_active", "listener" => listener).increment(delta);
}

/// A connection closed at once because its listener was at its cap.
pub fn connection_refused(listener: &'static str) {
    metrics::counter!("sluice_relay_connections_refused_total", "listener" => listener).increment(1);
}

pub fn accept_failed(listener: &'static str) {
    metrics::counter!("sluice_relay_accept_errors_total", "listener" => listener).increment(1);
}

/// A connection on a lease port (or a leased-only resource's fixed port) was refused.
pub fn lease_refused(reason: &'static str) {
    metrics::counter!("sluice_relay_lease_refused_total", "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("orders db"), "orders db");
        assert_eq!(label_value("Zürich 🚀"), "Zürich 🚀");
        assert_eq!(label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label_value("two\nlines"), "two\\nlines");
    }

    #[test]
    fn resource_info_lists_every_resource() {
        let r = |id: &str, name: &str, customer: Option<&str>| Resource {
            id: id.into(),
            name: name.into(),
            customer_id: customer.map(Into::into),
            port: 20000,
            generation: 1,
            created_at: 0,
            last_seen_at: None,
        };
        let text = resource_info(&[r("res_a", "orders-db", Some("cus_1")), r("res_b", "Café \"x\"", None)]);
        assert!(text.starts_with("# HELP sluice_resource_info "), "{text}");
        assert!(text.contains("# TYPE sluice_resource_info gauge\n"), "{text}");
        assert!(text.contains("sluice_resource_info{resource=\"res_a\",name=\"orders-db\",customer=\"cus_1\"} 1\n"));
        assert!(text.contains("sluice_resource_info{resource=\"res_b\",name=\"Café \\\"x\\\"\",customer=\"\"} 1\n"));
    }
}
