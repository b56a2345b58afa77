//! The small-message figure: a real PostgreSQL server (Debian's `postgresql`, installed
//! by `scripts/install-test-deps.sh`) behind each tunnel, and `pgbench -S` (select-only:
//! one small query and one small answer per transaction) through the tunnel.
//!
//! The cluster is made once per run ([`Cluster::init`]: initdb as user `postgres`,
//! trust authentication, `pgbench -i -s 1`), in a directory the `postgres` user owns
//! (PostgreSQL refuses to run as root). For each tunnel the server is started on the
//! tunnel's backend port ([`Cluster::serve`]) after the iperf3 runs have freed it, and
//! stopped (fast shutdown) when the returned [`Server`] is dropped. Only TCP on
//! 127.0.0.1: no Unix socket, so the path length of the run directory does not matter.
//!
//! This repeats the few lines of `tests/src/services.rs` instead of linking the tests
//! crate, as [`super::sluice`] does for the relay.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::procs::{self, Child};

/// The database `pgbench -i` fills (the default one).
const DB: &str = "postgres";

/// An initialised PostgreSQL data directory with the pgbench tables, not running.
pub struct Cluster {
    bin: PathBuf,
    root: PathBuf,
    starts: std::cell::Cell<u32>,
}

/// A running server; fast shutdown on drop.
pub struct Server<'c> {
    cluster: &'c Cluster,
    child: Option<Child>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program` run as user `postgres` when we are root.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// The newest `/usr/lib/postgresql/N/bin` that holds `postgres`.
fn find_bin() -> Result<PathBuf> {
    let mut bins: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("/usr/lib/postgresql is missing: install Debian's postgresql (scripts/install-test-deps.sh)")?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("postgres").is_file())
        .collect();
    bins.sort_by_key(|b| b.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()).unwrap_or(0));
    bins.pop().context("no /usr/lib/postgresql/*/bin/postgres: install Debian's postgresql")
}

/// "PostgreSQL 15.18, pgbench 15.18" (what ran), or "?" parts when not found.
pub fn versions() -> String {
    let server = find_bin().map(|b| super::machine::version(&b.join("postgres"), &["--version"]));
    let client = super::machine::version(Path::new("pgbench"), &["--version"]);
    format!("PostgreSQL {}, pgbench {client}", server.unwrap_or_else(|_| "?".into()))
}

impl Cluster {
    /// initdb in `dir/pg` and `pgbench -i -s 1`, on a free port, then stops the server.
    pub fn init(dir: &Path) -> Result<Cluster> {
        let bin = find_bin()?;
        if !super::install::on_path("pgbench") {
            bail!("pgbench is missing: install Debian's postgresql-client (scripts/install-bench-peers.sh)");
        }
        let root = dir.join("pg");
        std::fs::create_dir_all(&root)?;
        // The postgres user must reach its directory inside the run directory.
        for p in [dir, &root] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
        }
        if is_root() {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:postgres"]).arg(&root);
            procs::run_within("chown", chown, Duration::from_secs(30))?.ok("chown -R postgres the PostgreSQL dir")?;
        }
        let mut initdb = as_postgres(&bin.join("initdb"));
        initdb.arg("-D").arg(root.join("data"));
        initdb.args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"]);
        procs::run_within("initdb", initdb, Duration::from_secs(120))?.ok("initdb")?;
        let cluster = Cluster { bin, root, starts: std::cell::Cell::new(0) };
        let port = procs::free_port()?;
        let server = cluster.serve(port)?;
        let mut init = pgbench(port);
        init.args(["-i", "-s", "1", "-q", DB]);
        procs::run_within("pgbench -i", init, Duration::from_secs(300))?.ok("pgbench -i -s 1")?;
        drop(server);
        Ok(cluster)
    }

    /// Starts the server on 127.0.0.1:`port`; ready once `pg_isready` says so.
    pub fn serve(&self, port: u16) -> Result<Server<'_>> {
        self.starts.set(self.starts.get() + 1);
        let log = self.root.join(format!("postgres-{}.log", self.starts.get()));
        let mut cmd = as_postgres(&self.bin.join("postgres"));
        cmd.arg("-D").arg(self.root.join("data"));
        cmd.args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]);
        cmd.args(["-c", "fsync=off", "-c", "max_connections=50"]);
        let mut server = Server { cluster: self, child: Some(Child::spawn("postgres", cmd, &log)?) };
        procs::wait_for(Duration::from_secs(60), &format!("postgres to accept connections on {port}"), || {
            server.child.as_mut().expect("just started").check_running()?;
            let mut ready = Command::new(self.bin.join("pg_isready"));
            ready.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
            Ok(procs::run_within("pg_isready", ready, Duration::from_secs(10))?.status.success().then_some(()))
        })?;
        Ok(server)
    }

    /// The postmaster's pid (the process we spawned may be `runuser`, its parent).
    fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.root.join("data").join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Server<'_> {
    /// Fast shutdown (SIGINT: closes every connection, checkpoints, exits), so the next
    /// start needs no crash recovery; killed when it takes longer than 30 s.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Some(pid) = self.cluster.postmaster_pid() {
            // SAFETY: kill(2) on the postmaster this benchmark started.
            unsafe { libc::kill(pid, libc::SIGINT) };
            let _ = procs::wait_for(Duration::from_secs(30), "postgres to stop", || {
                Ok(child.check_running().is_err().then_some(()))
            });
        }
        drop(child);
    }
}

/// `pgbench` against 127.0.0.1:`port` as user postgres, without TLS (the tunnel's own
/// encryption is what is measured).
fn pgbench(port: u16) -> Command {
    let mut cmd = Command::new("pgbench");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"]);
    cmd.env("PGSSLMODE", "disable").env("PGCONNECT_TIMEOUT", "10");
    cmd
}

/// `pgbench -S -n -c CLIENTS -T SECS` through 127.0.0.1:`port`: transactions per second
/// excluding the connection time.
pub fn select_only(port: u16, clients: u32, secs: u32) -> Result<f64> {
    let mut cmd = pgbench(port);
    cmd.args(["-S", "-n", "-c", &clients.to_string(), "-T", &secs.to_string(), DB]);
    let done = procs::run_within("pgbench -S", cmd, Duration::from_secs(u64::from(secs) + 60))?;
    let status = done.status;
    let text = format!("{}\n{}", done.stdout, done.stderr);
    let tps = parse_tps(&text);
    if !status.success() {
        bail!("pgbench -S failed ({status}): {}", text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or(""));
    }
    let failed = parse_failed(&text).unwrap_or(0);
    if failed > 0 {
        bail!("pgbench -S: {failed} transactions failed");
    }
    tps.context("pgbench printed no `tps = … (without initial connection time)` line")
}

/// The `tps = N (without initial connection time)` figure of pgbench's summary
/// (before pgbench 14: `(excluding connections establishing)`); never the figure that
/// includes connecting.
fn parse_tps(text: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("tps = ")?;
        let (num, why) = rest.split_once(' ')?;
        let excludes_connecting = why.contains("without initial connection time") || why.contains("excluding");
        excludes_connecting.then(|| num.parse().ok())?
    })
}

/// `number of failed transactions: N (…)` (pgbench 15 and later print it).
fn parse_failed(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("number of failed transactions:")?.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pgbench 15's summary, as printed by `pgbench -S -n -c 4 -T 2`.
    const SUMMARY: &str = "pgbench (15.14 (Debian 15.14-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: simple
number of clients: 4
number of threads: 1
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 24601
number of failed transactions: 0 (0.000%)
latency average = 0.325 ms
initial connection time = 6.120 ms
tps = 12300.912345 (without initial connection time)
";

    #[test]
    fn reads_tps_without_connection_time() {
        assert_eq!(parse_tps(SUMMARY), Some(12300.912345));
        assert_eq!(parse_failed(SUMMARY), Some(0));
    }

    #[test]
    fn older_pgbench_prints_both_tps_lines() {
        let old =
            "tps = 900.5 (including connections establishing)\ntps = 1000.25 (excluding connections establishing)\n";
        assert_eq!(parse_tps(old), Some(1000.25));
        assert_eq!(parse_tps("tps = 12 (including connections establishing)"), None);
        assert_eq!(parse_tps("no summary"), None);
        assert_eq!(parse_failed("number of failed transactions: 3 (0.1%)"), Some(3));
    }
}
