//! `cargo xtask sim-agents [--agents N[,N…]] [--streams M] [--pool N] [--heartbeat-secs S]
//! [--window-secs W] [--agents-per-resource K]`: what idle agents and open streams cost
//! one relay (issue #12; the figures of docs/scaling.md). Kept out of `cargo xtask test`:
//! it runs for minutes.
//!
//! It builds the release binaries and runs the `#[ignore]`d measurement in
//! `tests/tests/sim_agents.rs`: one real relay on loopback, its quotas raised for the
//! run, and thousands of simulated agents in one tokio process (`tests/src/sim.rs`: each
//! an enrolled identity, a mutual-TLS control session with heartbeats, a pool of idle
//! data connections; an in-process echo instead of a private service). At each agent
//! count it prints the relay's RSS, descriptors and CPU, and the control messages per
//! second each way; then the same with M streams held open; then the cost per agent and
//! per stream.

use anyhow::{Result, bail};

use crate::{EBPF_CRATE, cargo, run};

pub const USAGE: &str = "  sim-agents [--agents N[,N…]] [--streams M] [--pool N] [--heartbeat-secs S] [--window-secs W]\n             \
                         [--agents-per-resource K]\n                  \
                         simulated agents against one relay: RSS, fds, CPU, control msgs/s per idle agent and per\n                  \
                         stream (defaults: 500,2000 agents, 1000 streams, pool 4, heartbeat 10 s, 60 s windows)\n";

/// The run asked for, as the measurement's environment variables.
#[derive(Debug, PartialEq)]
struct Plan(Vec<(&'static str, String)>);

/// Reads the flags; each is checked here so a typo fails before the build.
fn plan(args: &[String]) -> Result<Plan> {
    let mut env = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let var = match flag.as_str() {
            "--agents" => "SLUICE_SIM_AGENTS",
            "--streams" => "SLUICE_SIM_STREAMS",
            "--pool" => "SLUICE_SIM_POOL",
            "--heartbeat-secs" => "SLUICE_SIM_HEARTBEAT_SECS",
            "--window-secs" => "SLUICE_SIM_WINDOW_SECS",
            "--agents-per-resource" => "SLUICE_SIM_AGENTS_PER_RESOURCE",
            other => bail!("sim-agents: unknown flag {other:?}\nusage:\n{USAGE}"),
        };
        let Some(value) = it.next() else { bail!("sim-agents: {flag} needs a value") };
        let numbers: Vec<&str> = value.split(',').collect();
        let ok = numbers.iter().all(|n| n.trim().parse::<u64>().is_ok_and(|n| n >= 1 || flag == "--streams"));
        if !ok || (numbers.len() > 1 && flag != "--agents") {
            bail!(
                "sim-agents: {flag} takes a whole number{} (got {value:?})",
                if flag == "--agents" { " or a list like 500,2000" } else { "" }
            );
        }
        if flag == "--pool" && value.parse::<u32>().is_ok_and(|p| p > 64) {
            bail!("sim-agents: --pool is the relay's --pool-size, 1 to 64 (got {value})");
        }
        env.push((var, value.clone()));
    }
    Ok(Plan(env))
}

pub fn cli(args: &[String]) -> Result<()> {
    let plan = plan(args)?;
    run(
        "build release binaries",
        cargo().args(["build", "--release", "--workspace", "--exclude", EBPF_CRATE, "--bins"]),
    )?;
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--release",
        "-p",
        "sluice-e2e",
        "--test",
        "sim_agents",
        "--",
        "--ignored",
        "--nocapture",
        "measure_relay_cost_per_agent_and_stream",
    ]);
    for (k, v) in &plan.0 {
        cmd.env(k, v);
    }
    run("simulated agents", &mut cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_become_the_measurement_environment() {
        assert_eq!(plan(&a(&[])).unwrap(), Plan(vec![]));
        let p = plan(&a(&["--agents", "500,2000", "--streams", "0", "--pool", "4", "--heartbeat-secs", "1"])).unwrap();
        assert_eq!(
            p.0,
            vec![
                ("SLUICE_SIM_AGENTS", "500,2000".to_string()),
                ("SLUICE_SIM_STREAMS", "0".to_string()),
                ("SLUICE_SIM_POOL", "4".to_string()),
                ("SLUICE_SIM_HEARTBEAT_SECS", "1".to_string()),
            ]
        );
    }

    #[test]
    fn nonsense_is_refused_before_the_build() {
        for bad in [
            &["--agents"][..],
            &["--agents", "many"],
            &["--agents", "0"],
            &["--pool", "2,4"],
            &["--pool", "65"],
            &["--heartbeat-secs", "0"],
            &["--hours", "1"],
        ] {
            assert!(plan(&a(bad)).is_err(), "{bad:?}");
        }
    }
}
