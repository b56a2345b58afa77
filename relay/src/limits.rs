//! Every bound the relay puts on what peers may hold: connections, handshakes, streams,
//! enrollments and resources per customer. One home, so docs/reliability.md can list
//! them all with their flags and defaults; each field is a `sluice serve` flag.

/// The relay's resource limits (`sluice serve --help`, "Limits").
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Limits")]
pub struct Limits {}
