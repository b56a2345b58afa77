//! `cargo xtask soak [--minutes N]`: the long soak of issue #11, kept out of
//! `cargo xtask test` (it runs for a quarter of an hour by default). It builds the
//! release binaries and runs the `#[ignore]`d test `tests/tests/soak.rs`: one relay and
//! one agent on loopback, continuous churn of short and medium streams checked with
//! SHA-256, the agent killed and restarted once a minute, the relay's and agent's RSS
//! and descriptors sampled every 10 s; it prints the samples, their least-squares slopes
//! and the stream totals, and fails on any corrupted stream or any failure outside an
//! agent restart.

use anyhow::{Result, bail};

use crate::{EBPF_CRATE, cargo, run};

pub const USAGE: &str = "  soak [--minutes N]  relay + agent under churn with an agent restart a minute (default 15 min):\n                  \
                         RSS and fd slopes, streams ok/failed/corrupted (not part of `test`)\n";

/// Minutes from `--minutes N` (default 15).
fn minutes(args: &[String]) -> Result<u64> {
    match args {
        [] => Ok(15),
        [flag, n] if flag == "--minutes" => match n.parse::<u64>() {
            Ok(m) if m >= 1 => Ok(m),
            _ => bail!("--minutes takes a whole number of minutes, at least 1 (got {n:?})"),
        },
        _ => bail!("usage: cargo xtask soak [--minutes N]"),
    }
}

pub fn cli(args: &[String]) -> Result<()> {
    let minutes = minutes(args)?;
    run(
        "build release binaries",
        cargo().args(["build", "--release", "--workspace", "--exclude", EBPF_CRATE, "--bins"]),
    )?;
    run(
        &format!("soak, {minutes} min"),
        cargo()
            .args(["test", "--release", "-p", "sluice-e2e", "--test", "soak", "--", "--ignored", "--nocapture"])
            .env("SLUICE_SOAK_MINUTES", minutes.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_default_to_fifteen_and_reject_nonsense() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(minutes(&a(&[])).unwrap(), 15);
        assert_eq!(minutes(&a(&["--minutes", "4"])).unwrap(), 4);
        assert!(minutes(&a(&["--minutes", "0"])).is_err());
        assert!(minutes(&a(&["--minutes"])).is_err());
        assert!(minutes(&a(&["--hours", "1"])).is_err());
    }
}
