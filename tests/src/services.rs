//! Real private services for end-to-end tests, started by the tests themselves on free
//! loopback ports: a PostgreSQL server (Debian's postgresql) and an OpenSSH sftp server
//! (Debian's openssh-server), each in its own temporary directory.
//!
//! `scripts/install-test-deps.sh` (run by `cargo xtask test`) installs the packages.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Proc, free_port, wait_for};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn must_exist(path: &Path, package: &str) {
    assert!(
        path.exists(),
        "{} is missing: install Debian's {package} (scripts/install-test-deps.sh, run by `cargo xtask test`)",
        path.display()
    );
}

/// Runs `cmd` as the `postgres` user when we are root (PostgreSQL refuses to run as root).
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL server on 127.0.0.1:`port` with trust authentication for user `postgres`.
pub struct Postgres {
    pub port: u16,
    pub proc: Proc,
    root: PathBuf,
    bin: PathBuf,
    /// Where its log goes (each start appends a number).
    log_dir: PathBuf,
    starts: u32,
}

impl Postgres {
    pub fn start(dir: &Path) -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).find(|b| b.join("postgres").exists()))
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
        must_exist(&bin.join("postgres"), "postgresql");
        let root = dir.join("pg");
        std::fs::create_dir_all(&root).unwrap();
        // The postgres user must be able to reach its directory inside our temp dir.
        for p in [dir, &root] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&root).status().unwrap();
            assert!(ok.success(), "chown to postgres failed");
        }
        let data = root.join("data");
        let out = as_postgres(&bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let proc = Self::spawn(&bin, &root, port, dir.join("postgres.log"));
        Postgres { port, proc, root, bin, log_dir: dir.to_owned(), starts: 1 }
    }

    fn spawn(bin: &Path, root: &Path, port: u16, log: PathBuf) -> Proc {
        let mut cmd = as_postgres(&bin.join("postgres"));
        cmd.arg("-D")
            .arg(root.join("data"))
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", root.display()))
            // Every relay of every test of one process on one server.
            .args(["-c", "fsync=off", "-c", "max_connections=400"]);
        let proc = Proc::spawn(cmd, log);
        wait_for(Duration::from_secs(30), "postgres to accept connections", || {
            let s = Command::new(bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .output()
                .ok()?;
            s.status.success().then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_text()));
        proc
    }

    /// The postmaster's pid (the process we spawned may be `runuser`, its parent).
    fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.root.join("data").join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Stops the server (fast shutdown, SIGINT: it closes every connection and exits).
    pub fn stop(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            // SAFETY: kill(2) on the postmaster this test started.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        if self.proc.wait_exit(Duration::from_secs(30)).is_none() {
            self.proc.kill();
        }
    }

    /// Stops the server without waiting (SIGQUIT: immediate shutdown), e.g. at exit.
    pub fn stop_immediately(&self) {
        if let Some(pid) = self.postmaster_pid() {
            // SAFETY: kill(2) on the postmaster this test started.
            unsafe { libc::kill(pid, libc::SIGQUIT) };
        }
    }

    /// Starts the server again on the same port and data.
    pub fn start_again(&mut self) {
        self.starts += 1;
        let log = self.log_dir.join(format!("postgres-{}.log", self.starts));
        wait_for(Duration::from_secs(30), "the old postgres processes to exit", || {
            std::net::TcpListener::bind(("127.0.0.1", self.port)).ok().map(drop)
        })
        .unwrap();
        self.proc = Self::spawn(&self.bin, &self.root, self.port, log);
    }

    /// The URL of database `db` (user postgres, no password: trust authentication).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs one SQL statement with psql as user postgres; panics with psql's answer on failure.
    pub fn sql(&self, db: &str, statement: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", statement])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {statement:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Creates database `db` unless it exists.
    pub fn create_database(&self, db: &str) {
        if self.sql("postgres", &format!("SELECT 1 FROM pg_database WHERE datname = '{db}'")).is_empty() {
            self.sql("postgres", &format!("CREATE DATABASE \"{db}\""));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Killing `runuser` (our child when we are root) would leave the server running.
        self.stop_immediately();
    }
}

/// An OpenSSH server on 127.0.0.1:`port` that accepts `user` with `key` and serves sftp.
pub struct Sshd {
    pub port: u16,
    pub user: String,
    pub key: PathBuf,
    pub proc: Proc,
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).output().unwrap();
    assert!(out.status.success(), "ssh-keygen failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl Sshd {
    pub fn start(dir: &Path) -> Sshd {
        let sshd = PathBuf::from("/usr/sbin/sshd");
        must_exist(&sshd, "openssh-server");
        let root = dir.join("ssh");
        std::fs::create_dir_all(&root).unwrap();
        keygen(&root.join("host_key"));
        keygen(&root.join("user_key"));
        std::fs::copy(root.join("user_key.pub"), root.join("authorized_keys")).unwrap();
        if is_root() {
            // Privilege separation directory expected by Debian's sshd.
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap().trim().to_owned();
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\nAuthorizedKeysFile {ak}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n\
             AllowUsers {user}\n",
            hk = root.join("host_key").display(),
            pid = root.join("sshd.pid").display(),
            ak = root.join("authorized_keys").display(),
        );
        std::fs::write(root.join("sshd_config"), config).unwrap();
        let mut cmd = Command::new(&sshd);
        cmd.args(["-D", "-e", "-f"]).arg(root.join("sshd_config"));
        let proc = Proc::spawn(cmd, dir.join("sshd.log"));
        wait_for(Duration::from_secs(20), "sshd to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).ok())
            .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_text()));
        Sshd { port, user, key: root.join("user_key"), proc }
    }

    /// Runs an sftp batch against `host:port` (e.g. a Sluice endpoint).
    pub fn sftp(&self, host: &str, port: u16, batch: &str, dir: &Path) -> std::process::Output {
        let batch_file = dir.join("sftp-batch");
        std::fs::write(&batch_file, batch).unwrap();
        Command::new("sftp")
            .args(["-q", "-P", &port.to_string(), "-i"])
            .arg(&self.key)
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
            .args(["-o", "LogLevel=ERROR", "-b"])
            .arg(&batch_file)
            .arg(format!("{}@{host}", self.user))
            .output()
            .unwrap()
    }
}
