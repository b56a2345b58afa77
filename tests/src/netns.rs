//! A network namespace of the test's own, joined to the host by a veth pair, for faults
//! that need a real network path: packet loss and blackholes (nftables in the namespace),
//! a small MTU, a firewall that drops every inbound connection.
//!
//! The host end gets `10.A.B.1/30`, the namespace end `10.A.B.2/30`; segmentation
//! offloads are off on both ends so that a dropped packet is one MTU-sized segment, not a
//! 64 KiB super-packet. Everything is removed when the handle drops. Needs root, `ip`,
//! `nft` and `ethtool` (`scripts/install-test-deps.sh` installs them); [`Netns::create`]
//! says why not when it cannot.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The namespace, its veth pair and its addresses.
pub struct Netns {
    pub name: String,
    host_if: String,
    ns_if: String,
    /// The host's address on the veth (where the namespace reaches the host).
    pub host_ip: Ipv4Addr,
    /// The namespace's address.
    pub ns_ip: Ipv4Addr,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str], input: Option<&str>) -> Result<(), String> {
    use std::io::Write;
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    cmd.stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if let Some(text) = input {
        child.stdin.take().unwrap().write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

impl Netns {
    /// Creates the namespace and its veth pair, or says why it cannot (not root, tools
    /// missing). Names and addresses are unique per process and call.
    pub fn create() -> Result<Netns, String> {
        for tool in ["ip", "nft", "ethtool"] {
            if which(tool).is_none() {
                return Err(format!("`{tool}` is not installed (bash scripts/install-test-deps.sh installs it)"));
            }
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 100_000, n);
        let (a, b) = (20 + (pid % 200) as u8, (n % 64 * 4) as u8);
        let ns = Netns {
            name: format!("sluice-{tag}"),
            host_if: format!("slh{tag}"),
            ns_if: format!("sln{tag}"),
            host_ip: Ipv4Addr::new(10, a, b, 1),
            ns_ip: Ipv4Addr::new(10, a, b, 2),
        };
        let (h, i) = (ns.host_if.as_str(), ns.ns_if.as_str());
        let host_cidr = format!("{}/30", ns.host_ip);
        let ns_cidr = format!("{}/30", ns.ns_ip);
        run(&["ip", "netns", "add", &ns.name], None)?;
        let steps: Vec<Vec<&str>> = vec![
            vec!["ip", "link", "add", h, "type", "veth", "peer", "name", i],
            vec!["ip", "link", "set", i, "netns", &ns.name],
            vec!["ip", "addr", "add", &host_cidr, "dev", h],
            vec!["ip", "link", "set", h, "up"],
            vec!["ip", "-n", &ns.name, "addr", "add", &ns_cidr, "dev", i],
            vec!["ip", "-n", &ns.name, "link", "set", i, "up"],
            vec!["ip", "-n", &ns.name, "link", "set", "lo", "up"],
            vec!["ethtool", "-K", h, "gso", "off", "tso", "off", "gro", "off"],
            vec!["ip", "netns", "exec", &ns.name, "ethtool", "-K", i, "gso", "off", "tso", "off", "gro", "off"],
        ];
        for s in steps {
            run(&s, None)?;
        }
        Ok(ns)
    }

    /// Replaces the namespace's nftables rules with `rules` (the body of an `inet`
    /// table named `fault`, e.g. chains `input` and `output`); empty removes them.
    pub fn set_rules(&self, rules: &str) -> Result<(), String> {
        let _ = run(&["ip", "netns", "exec", &self.name, "nft", "delete", "table", "inet", "fault"], None);
        if rules.trim().is_empty() {
            return Ok(());
        }
        let script = format!("table inet fault {{\n{rules}\n}}\n");
        run(&["ip", "netns", "exec", &self.name, "nft", "-f", "-"], Some(&script))
    }

    /// Drops `percent` % of TCP packets at random, both ways.
    pub fn drop_percent(&self, percent: u32) -> Result<(), String> {
        self.set_rules(&format!(
            "chain input {{ type filter hook input priority 0; meta l4proto tcp numgen random mod 100 < {percent} counter drop; }}
             chain output {{ type filter hook output priority 0; meta l4proto tcp numgen random mod 100 < {percent} counter drop; }}"
        ))
    }

    /// Packets the rules' counters dropped so far.
    pub fn dropped(&self) -> u64 {
        let out =
            Command::new("ip").args(["netns", "exec", &self.name, "nft", "list", "table", "inet", "fault"]).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        text.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum()
    }

    /// Drops every packet to and from the veth (a blackhole; loopback inside stays up).
    pub fn blackhole(&self) -> Result<(), String> {
        let i = &self.ns_if;
        self.set_rules(&format!(
            "chain input {{ type filter hook input priority 0; iifname \"{i}\" drop; }}
             chain output {{ type filter hook output priority 0; oifname \"{i}\" drop; }}"
        ))
    }

    /// Drops every new inbound connection: only what the namespace dialed gets answers.
    pub fn no_inbound(&self) -> Result<(), String> {
        self.set_rules(
            "chain input { type filter hook input priority 0; policy drop;
                 iifname \"lo\" accept; ct state established,related accept; }",
        )
    }

    /// Sets the MTU of both ends of the veth.
    pub fn set_mtu(&self, mtu: u32) -> Result<(), String> {
        let m = mtu.to_string();
        run(&["ip", "link", "set", &self.host_if, "mtu", &m], None)?;
        run(&["ip", "-n", &self.name, "link", "set", &self.ns_if, "mtu", &m], None)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it, so
    /// the child's pid is the program's).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new(which("ip").unwrap_or_else(|| PathBuf::from("/usr/sbin/ip")));
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "link", "del", &self.host_if], None);
        let _ = run(&["ip", "netns", "del", &self.name], None);
    }
}

/// The full path of `tool` in the usual system directories.
fn which(tool: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().map(|d| PathBuf::from(d).join(tool)).find(|p| p.exists())
}
