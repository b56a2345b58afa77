//! Starts Sluice the way an operator does: a real `sluice serve` relay on loopback, a
//! customer and a registration JWT from the `sluice` CLI, and a `sluice-agent` process
//! for the backend; ready once the CLI lists the resource as AVAILABLE.
//!
//! This repeats the few CLI calls of the end-to-end harness (`tests/src/lib.rs`) instead
//! of linking it, which would pull the whole test crate's dependencies into xtask.
//! The agent runs with its defaults: the data path this kernel supports (user-space
//! rustls without kTLS) and its default byte counter.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::peers::Tunnel;
use super::procs::{self, Child};

const RESOURCE: &str = "bench";

/// A relay on fresh loopback ports and data directory, and an agent for 127.0.0.1:`backend`.
pub fn start(bins: &Path, backend: u16, dir: &Path) -> Result<Tunnel> {
    start_with(bins, backend, dir, None, "auto")
}

/// [`start`], with the agent (logging at info, so its log says which byte counter it
/// uses) in the cgroup2 directory `agent_cgroup` when given: its eBPF counter then
/// attaches to that cgroup, which holds nothing else unless the caller puts it there.
/// `counter` is the agent's `SLUICE_COUNTER`.
pub fn start_with(bins: &Path, backend: u16, dir: &Path, agent_cgroup: Option<&Path>, counter: &str) -> Result<Tunnel> {
    let data = dir.join("relay-data");
    let (agent_port, admin_port, resource_ports) =
        (procs::free_port()?, procs::free_port()?, procs::free_port_range(4)?);
    let mut relay = Command::new(bins.join("sluice"));
    relay
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--agent-listen", &format!("127.0.0.1:{agent_port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(["--public-url", &format!("https://127.0.0.1:{agent_port}")])
        .args(["--resource-bind", "127.0.0.1"])
        .args(["--resource-ports", &format!("{resource_ports}-{}", resource_ports + 3)])
        .args(["--log", "warn"]);
    let mut procs = vec![Child::spawn("sluice relay", relay, &dir.join("relay.log"))?];
    // The relay writes its admin URL once its listeners are bound and its store is open.
    let url_file = data.join("admin-url");
    procs::wait_for(Duration::from_secs(30), "the relay to be ready", || {
        procs[0].check_running()?;
        Ok(url_file.exists().then_some(()))
    })?;
    let cli = Cli { bins, data: &data };
    let customer = cli.run(&["customers", "create", "bench"])?;
    let jwt = cli.run(&["resources", "registration-jwt", "--customer-id", &customer])?;

    let mut agent = match agent_cgroup {
        // The shell joins the cgroup, then becomes the agent (same pid) by exec.
        Some(cgroup) => {
            let mut sh = Command::new("/bin/sh");
            sh.args(["-c", "echo $$ > \"$1/cgroup.procs\" && exec \"$2\"", "sh"]);
            sh.arg(cgroup).arg(bins.join("sluice-agent"));
            sh
        }
        None => Command::new(bins.join("sluice-agent")),
    };
    agent
        .env_clear()
        .env("STATE_DIR", dir.join("agent-state"))
        .env("APP_HOST", "127.0.0.1")
        .env("APP_PORT", backend.to_string())
        .env("NAME", RESOURCE)
        .env("REGISTRATION_JWT", jwt)
        .env("SLUICE_COUNTER", counter)
        .env("SLUICE_LOG", if agent_cgroup.is_some() { "info" } else { "warn" });
    // For A/B runs of what giving back start-up's code saves.
    if let Some(keep) = std::env::var_os("SLUICE_KEEP_STARTUP_CODE") {
        agent.env("SLUICE_KEEP_STARTUP_CODE", keep);
    }
    procs.insert(0, Child::spawn("sluice-agent", agent, &dir.join("agent.log"))?);
    procs::wait_for(Duration::from_secs(30), &format!("resource {RESOURCE} to be AVAILABLE"), || {
        for p in procs.iter_mut() {
            p.check_running()?;
        }
        Ok((cli.status()?.as_deref() == Some("AVAILABLE")).then_some(()))
    })?;
    let endpoint = cli.run(&["resources", "endpoint", RESOURCE])?;
    let public_port = parse_loopback_endpoint(&endpoint)?;
    Ok(Tunnel { public_port, procs, agent: Some(0), tls_port: None })
}

/// The `sluice` admin CLI of one relay (found through its data directory).
struct Cli<'a> {
    bins: &'a Path,
    data: &'a Path,
}

impl Cli<'_> {
    /// Runs `sluice ARGS --data-dir DATA`; returns trimmed stdout.
    fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(self.bins.join("sluice"));
        cmd.args(args).arg("--data-dir").arg(self.data).env("SLUICE_LOG", "warn");
        let what = format!("sluice {}", args.join(" "));
        Ok(procs::run_within(&what, cmd, Duration::from_secs(30))?.ok(&what)?.trim().to_owned())
    }

    /// The status of the benchmark's resource, if the relay lists it yet.
    fn status(&self) -> Result<Option<String>> {
        let list: serde_json::Value = serde_json::from_str(&self.run(&["resources", "list", "--output", "json"])?)
            .context("parsing `sluice resources list --output json`")?;
        let resources = list.as_array().context("resources list is not a JSON array")?;
        let ours = resources.iter().find(|r| r["name"] == RESOURCE);
        Ok(ours.and_then(|r| r["status"].as_str()).map(str::to_owned))
    }
}

/// The port of a `127.0.0.1:PORT` endpoint (the benchmark never leaves loopback).
fn parse_loopback_endpoint(endpoint: &str) -> Result<u16> {
    let Some((host, port)) = endpoint.rsplit_once(':') else { bail!("endpoint {endpoint:?} is not host:port") };
    if host != "127.0.0.1" && host != "localhost" {
        bail!("endpoint {endpoint:?} is not on loopback");
    }
    port.parse().with_context(|| format!("endpoint {endpoint:?}: bad port"))
}

#[cfg(test)]
mod tests {
    use super::parse_loopback_endpoint;

    #[test]
    fn endpoints_must_be_loopback() {
        assert_eq!(parse_loopback_endpoint("127.0.0.1:40001").unwrap(), 40001);
        assert!(parse_loopback_endpoint("10.0.0.1:40001").is_err());
        assert!(parse_loopback_endpoint("127.0.0.1").is_err());
    }
}
