//! Every bound the relay puts on what peers may hold: connections, handshakes, streams,
//! enrollments and resources per customer. One home, so docs/reliability.md can list
//! them all with their flags and defaults; each field is a `sluice serve` flag.
//!
//! The connection caps share one budget, the process's file-descriptor limit: each admin
//! connection and each agent handshake holds one descriptor, each stream two (the client
//! and the data connection). [`Limits::fd_budget`] adds them up; at start the relay
//! raises its soft `RLIMIT_NOFILE` to the hard limit and warns when the caps do not fit
//! ([`crate::admission::raise_fd_limit`]).

use std::time::Duration;

use clap::builder::TypedValueParser as _;

/// The relay's resource limits (`sluice serve --help`, "Limits").
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Limits")]
pub struct Limits {
    /// Resources one customer may have (the org level, for JWTs without a customer,
    /// counts as one customer). An enrollment that would create one more is refused
    /// for good, naming the limit, so one customer replaying its JWT with new NAMEs
    /// cannot take the port range every other customer needs.
    #[arg(long, env = "SLUICE_MAX_RESOURCES_PER_CUSTOMER", default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_resources_per_customer: u32,
    /// Agents one registration JWT may enroll per hour (sliding window). A replayed or
    /// leaked JWT then yields this many certificates an hour, not thousands; refused
    /// agents retry with backoff.
    #[arg(long, env = "SLUICE_MAX_ENROLLMENTS_PER_JWT_PER_HOUR", default_value_t = 30,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_enrollments_per_jwt_per_hour: u32,
    /// Agents connected at once for one resource (an agent group). A further agent's
    /// session is refused (it retries with backoff) until one of them leaves.
    #[arg(long, env = "SLUICE_MAX_AGENTS_PER_RESOURCE", default_value_t = 16,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_agents_per_resource: u32,
    /// Seconds an agent has to answer a new stream before the relay suspects it stalled.
    /// With the stream's open the relay pings the agent's control session; an agent that
    /// answers neither within this time (stopped, frozen, cut off) is marked stalled: the
    /// stream — no client byte has been read yet — moves to another agent of the
    /// resource, and the stalled agent gets no new streams until it answers again. An
    /// agent that answers the ping is alive (its private service is slow to accept) and
    /// the stream keeps waiting for it, 20 s in all. Lower it to move streams sooner;
    /// raise it on machines so loaded that a ping may take longer.
    #[arg(long = "stream-open-deadline-secs", env = "SLUICE_STREAM_OPEN_DEADLINE_SECS", default_value = "3",
          value_parser = clap::value_parser!(u64).range(1..=60).map(Duration::from_secs))]
    pub stream_open_deadline: Duration,
    /// Admin API connections open at once. Beyond it a new connection is closed at once
    /// (counted in `sluice_relay_connections_refused_total{listener="admin"}`), so
    /// stalled HTTP clients cannot take the descriptors the agent and resource ports need.
    #[arg(long, env = "SLUICE_ADMIN_MAX_CONNECTIONS", value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub admin_max_connections: u32,
    /// Seconds an admin client may take to send a request's headers; also how long an
    /// idle keep-alive connection waits for its next request. Then the relay closes it.
    #[arg(long = "admin-header-timeout-secs", value_name = "SECS", env = "SLUICE_ADMIN_HEADER_TIMEOUT_SECS", default_value = "10",
          value_parser = clap::value_parser!(u64).range(1..=3600).map(Duration::from_secs))]
    pub admin_header_timeout: Duration,
    /// Seconds an admin connection may go without a byte moving either way (a stalled
    /// request body, a client that stops reading its answer); then the relay closes it.
    #[arg(long = "admin-idle-timeout-secs", value_name = "SECS", env = "SLUICE_ADMIN_IDLE_TIMEOUT_SECS", default_value = "60",
          value_parser = clap::value_parser!(u64).range(1..=86400).map(Duration::from_secs))]
    pub admin_idle_timeout: Duration,
    /// Agent-port connections not yet authenticated: TLS handshakes in progress and
    /// enrollments (which carry no client certificate). Beyond it a new connection is
    /// closed at once (`sluice_relay_connections_refused_total{listener="agent"}`); the
    /// agents it turns away retry with backoff. Each handshake may take 15 s at most.
    #[arg(long, env = "SLUICE_AGENT_MAX_HANDSHAKES", value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub agent_max_handshakes: u32,
    /// Streams open at once through one resource's port. Beyond it a new client gets a
    /// TCP reset (`sluice_relay_streams_failed_total{reason="limit"}`).
    #[arg(long, env = "SLUICE_MAX_STREAMS_PER_RESOURCE", value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_streams_per_resource: u32,
    /// Streams one agent (one control session) carries at once. New streams go to the
    /// resource's other agents; when every agent is at it, the client gets a TCP reset
    /// (`sluice_relay_streams_failed_total{reason="limit"}`). Bounds what one small host
    /// next to a database is asked to hold.
    #[arg(long, env = "SLUICE_MAX_STREAMS_PER_AGENT", value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_streams_per_agent: u32,
    /// Active endpoint leases one resource may have at once (`sluice leases create`).
    /// One more is refused (HTTP 429, naming this flag) until a lease ends, so a runaway
    /// job runner cannot take the whole --lease-ports range from other resources.
    #[arg(long, env = "SLUICE_MAX_LEASES_PER_RESOURCE", value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_leases_per_resource: u32,
    /// How long audit records (admin actions and streams, `sluice audit`) are kept,
    /// e.g. 30d, 12h: older ones are deleted at start and then every hour. By age, not
    /// size: a reviewer asks "who did what in the last N days", which a size cap would
    /// answer for a window that shrinks as traffic grows. Size the store for a stream
    /// record (about 550 bytes on SQLite, measured) per stream over this window.
    #[arg(long, env = "SLUICE_AUDIT_RETENTION", value_name = "DURATION", default_value = "30d",
          value_parser = parse_retention)]
    pub audit_retention: Duration,
}

/// An audit retention: at least 1 hour, at most 100 years.
fn parse_retention(s: &str) -> Result<Duration, String> {
    let secs = crate::cli::parse_duration_secs(s)?;
    if secs < 3600 {
        return Err(format!("{s:?} is too short: keep audit records at least 1h"));
    }
    Ok(Duration::from_secs(secs))
}

/// Descriptors the relay needs besides what its caps admit: listeners, the store, log
/// files, idle pooled data connections, control sessions.
pub const FD_RESERVE: u64 = 256;

impl Limits {
    /// File descriptors the relay may need when every cap is reached with `resources`
    /// resources live: one per admin connection and per handshake, two per stream, plus
    /// [`FD_RESERVE`].
    pub fn fd_budget(&self, resources: usize) -> u64 {
        u64::from(self.admin_max_connections)
            + u64::from(self.agent_max_handshakes)
            + 2 * u64::from(self.max_streams_per_resource) * resources.max(1) as u64
            + FD_RESERVE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Limits {
        crate::relay::RelayConfig::defaults().limits
    }

    #[test]
    fn defaults_fit_a_typical_descriptor_limit() {
        let l = defaults();
        assert_eq!(l.admin_max_connections, 256);
        assert_eq!(l.admin_header_timeout, Duration::from_secs(10));
        assert_eq!(l.agent_max_handshakes, 256);
        assert_eq!(l.max_streams_per_resource, 1024);
        assert_eq!(l.audit_retention, Duration::from_secs(30 * 86_400));
        // 4096 is a common hard limit on older hosts; systemd's default hard limit is 524288.
        assert!(l.fd_budget(1) <= 4096, "{}", l.fd_budget(1));
        assert!(l.fd_budget(200) <= 524_288, "{}", l.fd_budget(200));
    }

    #[test]
    fn budget_counts_two_descriptors_per_stream() {
        let l =
            Limits { max_streams_per_resource: 10, admin_max_connections: 5, agent_max_handshakes: 7, ..defaults() };
        assert_eq!(l.fd_budget(0), 5 + 7 + 20 + FD_RESERVE, "no resource yet counts as one");
        assert_eq!(l.fd_budget(3), 5 + 7 + 60 + FD_RESERVE);
    }
}
