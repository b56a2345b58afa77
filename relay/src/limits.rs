//! Every bound the relay puts on what peers may hold: connections, handshakes, streams,
//! enrollments and resources per customer. One home, so docs/reliability.md can list
//! them all with their flags and defaults; each field is a `sluice serve` flag.

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
}
