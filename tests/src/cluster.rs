//! A cluster of relays for tests: one real PostgreSQL ([`crate::services::Postgres`])
//! and N `sluice serve` processes sharing it, each from a copy of the first relay's data
//! directory (same CA, JWT key and admin token), each with its own agent and admin port
//! and its own loopback address for resource ports (127.0.0.N: every relay binds the
//! resource's one port from the shared allocation).

use std::path::Path;
use std::time::Duration;

use crate::services::Postgres;
use crate::{Relay, free_port, free_port_range, wait_for};

/// The relays and their shared PostgreSQL.
pub struct Cluster {
    pub relays: Vec<Relay>,
    pub database_url: String,
    pub pg: Postgres,
    dir: std::path::PathBuf,
    /// The resource port range every relay shares.
    ports: (u16, u16),
    /// `sluice serve` flags every relay gets.
    extra: Vec<String>,
}

/// What a new member's data directory must not take from the first one: its lock, its
/// admin URL (the CLI's pointer to that relay) and an embedded database.
const NOT_COPIED: &[&str] = &["lock", "admin-url", "sluice.db", "sluice.db-wal", "sluice.db-shm"];

impl Cluster {
    /// Starts PostgreSQL and `n` relays with `extra` flags each (a 1 s heartbeat unless
    /// `--heartbeat-secs` is among them).
    pub fn start(dir: &Path, n: usize, extra: &[&str]) -> Cluster {
        let pg = Postgres::start(dir);
        let database_url = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);
        let mut c = Cluster {
            relays: Vec::new(),
            database_url,
            pg,
            dir: dir.to_path_buf(),
            ports: free_port_range(8),
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        for _ in 0..n {
            c.add_relay();
        }
        c.wait_members(n);
        c
    }

    /// Starts one more relay (a new member, or the replacement of a drained one) from a
    /// copy of the first relay's data directory; returns its index.
    pub fn add_relay(&mut self) -> usize {
        let i = self.relays.len();
        let rdir = self.dir.join(format!("relay{}", i + 1));
        std::fs::create_dir_all(&rdir).unwrap();
        if let Some(first) = self.relays.first() {
            copy_data_dir(&first.data_dir(), &rdir.join("relay-data"));
        }
        let mut args = self.extra.clone();
        args.extend(["--database-url".into(), self.database_url.clone()]);
        args.extend(["--resource-bind".into(), format!("127.0.0.{}", i + 1)]);
        let mut r = Relay {
            dir: rdir,
            agent_port: free_port(),
            admin_port: free_port(),
            ports: self.ports,
            proc: None,
            starts: 0,
            extra_args: args,
        };
        r.spawn();
        self.relays.push(r);
        i
    }

    /// Waits until the first relay lists `n` active relays.
    pub fn wait_members(&self, n: usize) {
        let live = self.relays.iter().position(|r| r.proc.is_some()).expect("a running relay");
        wait_for(Duration::from_secs(30), &format!("{n} active relays"), || {
            (self.active_ids(live).len() == n).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n--- relay log ---\n{}", self.relays[live].log()));
    }

    /// The ids of the active relays, as relay `via` lists them.
    pub fn active_ids(&self, via: usize) -> Vec<String> {
        let out = self.relays[via].cli(&["relays", "list", "--output", "json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        list.as_array()
            .map(|a| {
                a.iter()
                    .filter(|r| r["state"] == "active")
                    .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Relay `i`'s id in the store (from its "relay ready" log line).
    pub fn id_of(&self, i: usize) -> String {
        let log = self.relays[i].log();
        let line = log.lines().rev().find(|l| l.contains("relay ready")).expect("a ready relay");
        let at = line.find("relay_id=").expect("relay_id in the ready line") + "relay_id=".len();
        line[at..].split_whitespace().next().unwrap().trim_matches('"').to_owned()
    }

    /// `host:port` of resource `port` on relay `i`.
    pub fn endpoint(&self, i: usize, port: u16) -> String {
        format!("127.0.0.{}:{port}", i + 1)
    }

    /// Every relay's endpoint for the resource port, in relay order.
    pub fn endpoints(&self, port: u16) -> Vec<String> {
        (0..self.relays.len()).map(|i| self.endpoint(i, port)).collect()
    }

    /// All relays' logs, for a failure message.
    pub fn logs(&self) -> String {
        self.relays
            .iter()
            .enumerate()
            .map(|(i, r)| format!("--- relay {} log ---\n{}", i + 1, r.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Copies a relay's data directory for a new member (files only, modes kept).
fn copy_data_dir(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if NOT_COPIED.iter().any(|n| name == *n) || !e.file_type().unwrap().is_file() {
            continue;
        }
        std::fs::copy(e.path(), to.join(&name)).unwrap();
    }
}
