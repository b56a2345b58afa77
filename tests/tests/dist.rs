//! The shipped binaries as their images run them, without a Docker engine: a root file
//! system is built from the image's Dockerfile (its `COPY` lines with their `--chown` and
//! `--chmod`, its `ENV`, `USER`, `ENTRYPOINT` and `CMD`, read from `deploy/*.Dockerfile`)
//! and the image context `cargo xtask dist` made, and the static binary runs in it with
//! `chroot` as the image's uid (65532). That file system holds the binary, its state
//! directory, an `/etc/hosts` and `/dev/{null,zero,random,urandom}` (as Docker provides)
//! — nothing else: no shared library, no NSS module, no `/proc`. So these tests prove, in
//! CI:
//!
//! - the agent enrolls on first start and saves its identity in the image's state
//!   directory (what a fresh named volume inherits), resolving the relay's host name
//!   through the file system's own `/etc/hosts`; a stream goes through; the image's
//!   health check (`sluice-agent health`) answers 0; its idle RSS is printed;
//! - the negative: a state directory as a volume without the image's directory would be
//!   (root's, 0755) makes the agent exit 2 with the STATE_DIR message, after the image's
//!   final-exit delay;
//! - the relay image starts as 65532 on its data directory.
//!
//! Needs root (chroot, chown). Uses `target/dist/` when it holds the image contexts,
//! otherwise runs `cargo xtask dist` once (a few minutes).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sluice_e2e::load::echo_server;
use sluice_e2e::{Proc, Relay, free_port, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `target/dist/image-NAME/`, made by `cargo xtask dist` if it is not there yet.
fn image_context(name: &str) -> PathBuf {
    static DIST: OnceLock<()> = OnceLock::new();
    let dist = workspace().join("target").join("dist");
    DIST.get_or_init(|| {
        if ["agent", "relay"].iter().all(|i| dist.join(format!("image-{i}")).join("Dockerfile").exists()) {
            return;
        }
        eprintln!("{} has no image contexts: running `cargo xtask dist` (a few minutes)", dist.display());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo).current_dir(workspace()).args(["xtask", "dist"]).status().unwrap();
        assert!(status.success(), "cargo xtask dist failed ({status})");
    });
    dist.join(format!("image-{name}"))
}

/// What the tests take from a Dockerfile.
#[derive(Debug, Default)]
struct Dockerfile {
    copies: Vec<CopyLine>,
    env: Vec<(String, String)>,
    user: Option<(u32, u32)>,
    entrypoint: Vec<String>,
    /// The default arguments (`CMD`), used when a test gives none.
    cmd: Vec<String>,
}

/// `COPY [--chown=U:G] [--chmod=MODE] SRC DST`.
#[derive(Debug)]
struct CopyLine {
    src: String,
    dst: String,
    chown: Option<(u32, u32)>,
    chmod: Option<u32>,
}

fn uid_gid(s: &str) -> (u32, u32) {
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    (u.parse().unwrap_or_else(|_| panic!("numeric uid expected, got {s:?}")), g.parse().unwrap())
}

impl Dockerfile {
    fn parse(text: &str) -> Dockerfile {
        let mut d = Dockerfile::default();
        let joined = text.replace("\\\n", " ");
        for line in joined.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match word.to_ascii_uppercase().as_str() {
                "COPY" => {
                    let mut parts: Vec<&str> = rest.split_whitespace().collect();
                    let (mut chown, mut chmod) = (None, None);
                    parts.retain(|p| {
                        if let Some(v) = p.strip_prefix("--chown=") {
                            chown = Some(uid_gid(v));
                        } else if let Some(v) = p.strip_prefix("--chmod=") {
                            chmod = Some(u32::from_str_radix(v, 8).unwrap());
                        } else {
                            return !p.starts_with("--");
                        }
                        false
                    });
                    assert_eq!(parts.len(), 2, "COPY with one source and one destination expected: {line}");
                    d.copies.push(CopyLine { src: parts[0].into(), dst: parts[1].into(), chown, chmod });
                }
                "ENV" => {
                    for kv in rest.split_whitespace() {
                        let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("ENV KEY=VALUE expected: {line}"));
                        d.env.push((k.into(), v.into()));
                    }
                }
                "USER" => d.user = Some(uid_gid(rest)),
                "ENTRYPOINT" => d.entrypoint = serde_json::from_str(rest).expect("ENTRYPOINT in JSON form"),
                "CMD" => d.cmd = serde_json::from_str(rest).expect("CMD in JSON form"),
                _ => {}
            }
        }
        d
    }

    fn read(image: &str) -> Dockerfile {
        // deploy/ is the source (dist copies it into the context): a change there counts
        // even before dist runs again.
        let path = workspace().join("deploy").join(format!("{image}.Dockerfile"));
        Dockerfile::parse(&std::fs::read_to_string(&path).unwrap())
    }

    /// The image's files under `root`, as Docker's COPY makes them (parents root's, 0755),
    /// plus the `/etc/hosts` Docker writes into every container.
    fn build_rootfs(&self, context: &Path, root: &Path) {
        for c in &self.copies {
            let src = context.join(&c.src);
            let dst = root.join(c.dst.trim_start_matches('/'));
            mkdirs(dst.parent().unwrap(), root);
            if src.is_dir() {
                std::fs::create_dir_all(&dst).unwrap();
                assert_eq!(std::fs::read_dir(&src).unwrap().count(), 0, "only empty directories are copied: {src:?}");
            } else {
                std::fs::copy(&src, &dst).unwrap();
            }
            let mode = c.chmod.unwrap_or_else(|| src.metadata().unwrap().mode() & 0o7777);
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode)).unwrap();
            let (uid, gid) = c.chown.unwrap_or((0, 0));
            std::os::unix::fs::chown(&dst, Some(uid), Some(gid)).unwrap();
        }
        mkdirs(&root.join("etc"), root);
        std::fs::write(root.join("etc/hosts"), "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n").unwrap();
        // The device nodes every container (and a systemd PrivateDevices= unit) gets. The
        // relay needs /dev/urandom: in a static binary the getrandom crate's dlsym finds no
        // getrandom(3), so rand's ThreadRng reads the device instead.
        mkdirs(&root.join("dev"), root);
        for (name, minor) in [("null", 3), ("zero", 5), ("random", 8), ("urandom", 9)] {
            let path =
                std::ffi::CString::new(root.join("dev").join(name).into_os_string().into_encoded_bytes()).unwrap();
            // SAFETY: mknod(2) with a valid C string; makedev has no preconditions.
            let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, minor)) };
            assert_eq!(rc, 0, "mknod /dev/{name}: {}", std::io::Error::last_os_error());
            std::fs::set_permissions(root.join("dev").join(name), std::fs::Permissions::from_mode(0o666)).unwrap();
        }
    }

    /// `chroot --userspec=USER root ENTRYPOINT args…` (or `CMD` for no args) with the image's environment and
    /// nothing from this process's.
    fn command(&self, root: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
        let (uid, gid) = self.user.expect("the Dockerfile sets USER");
        let mut cmd = Command::new(chroot());
        cmd.arg(format!("--userspec={uid}:{gid}")).arg(root).args(&self.entrypoint).env_clear();
        match args {
            [] => cmd.args(&self.cmd),
            args => cmd.args(args),
        };
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// `chroot` (coreutils) by its path: the command's environment is cleared, PATH included.
fn chroot() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("chroot")).find(|p| p.is_file()).expect("chroot (coreutils) on PATH")
}

/// `create_dir_all` with the directories it makes at mode 0755 (root's umask may differ).
fn mkdirs(dir: &Path, root: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut d = dir;
    while d.starts_with(root) && d != root {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d = d.parent().unwrap();
    }
}

/// A test directory the image's uid can reach (/tmp here is not world-writable).
fn rootfs_dir(dir: &Path) -> PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = dir.join("rootfs");
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    root
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_agent_in_the_image_rootfs_enrolls_as_65532_and_saves_its_identity() {
    assert!(is_root(), "this test builds a root file system and chroots into it: run it as root (CI does)");
    let dir = test_dir("dist-agent");
    let image = Dockerfile::read("agent");
    assert_eq!(image.user, Some((65532, 65532)), "the agent image runs as distroless' nonroot");
    let root = rootfs_dir(dir.path());
    image.build_rootfs(&image_context("agent"), &root);
    let state = root.join("var/lib/sluice-agent");
    let meta = state.metadata().expect("the Dockerfile creates the state directory");
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (65532, 65532, 0o700), "state directory owner and mode");

    let relay = Relay::start(dir.path());
    let customer = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&customer);
    let echo = echo_server().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    // The relay by host name: only the rootfs' /etc/hosts knows `localhost` in there.
    let relay_url = format!("https://localhost:{}", relay.agent_port);
    let env = [
        ("APP_HOST", "127.0.0.1"),
        ("APP_PORT", &echo.port().to_string()),
        ("NAME", "db-in-image"),
        ("REGISTRATION_JWT", jwt.as_str()),
        ("SLUICE_URL", &relay_url),
        ("SLUICE_METRICS_LISTEN", &metrics),
        ("SLUICE_RECONNECT_MAX_SECS", "1"),
    ];
    let agent = Proc::spawn(image.command(&root, &[], &env), dir.path().join("agent.log"));
    relay.wait_status("db-in-image", "AVAILABLE", None);
    let log = agent.log_text();
    for file in ["agent.key", "agent.pem", "ca.pem", "enrollment.json"] {
        let m = state.join(file).metadata().unwrap_or_else(|e| panic!("{file} not saved ({e})\n{log}"));
        assert_eq!(m.uid(), 65532, "{file} belongs to the agent's uid");
    }
    assert_eq!(state.join("agent.key").metadata().unwrap().mode() & 0o777, 0o600);

    // A stream through the relay to the service, from the agent in the rootfs.
    let mut s = tokio::net::TcpStream::connect(relay.endpoint("db-in-image")).await.unwrap();
    s.write_all(b"ping from the platform").await.unwrap();
    let mut back = [0u8; 22];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"ping from the platform");
    drop(s);

    // The image's HEALTHCHECK, as Docker runs it: in the container, as its user.
    let health = image.command(&root, &["health"], &[("SLUICE_METRICS_LISTEN", &metrics)]).output().unwrap();
    assert!(
        health.status.success(),
        "sluice-agent health: {:?} {}{}",
        health.status,
        String::from_utf8_lossy(&health.stdout),
        String::from_utf8_lossy(&health.stderr)
    );

    // Idle RSS of the static agent (chroot execs it: same pid), settled for a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = vm_rss_kib(agent.child.id()).expect("VmRSS of the agent");
    eprintln!(
        "static agent in the image rootfs, idle with one session: VmRSS {rss} KiB ({:.1} MiB)",
        rss as f64 / 1024.0
    );
    let size = std::fs::metadata(root.join("usr/local/bin/sluice-agent")).unwrap().len();
    eprintln!("static agent binary: {:.1} MB", size as f64 / 1e6);
    drop((agent, relay));
}

#[test]
fn a_root_owned_state_dir_makes_the_image_agent_exit_2_after_its_delay() {
    assert!(is_root(), "this test builds a root file system and chroots into it: run it as root (CI does)");
    let dir = test_dir("dist-agent-perm");
    let image = Dockerfile::read("agent");
    let root = rootfs_dir(dir.path());
    image.build_rootfs(&image_context("agent"), &root);
    // What a fresh volume would be if the image did not own its directory: root's, 0755.
    let state = root.join("var/lib/sluice-agent");
    std::os::unix::fs::chown(&state, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = [
        ("APP_HOST", "127.0.0.1"),
        ("APP_PORT", "5432"),
        ("NAME", "db"),
        ("REGISTRATION_JWT", &well_formed_jwt()),
        // The image waits 300 s before a final exit; 1 s here shows the wait happens.
        ("SLUICE_EXIT_DELAY_SECS", "1"),
    ];
    let started = Instant::now();
    let out = image.command(&root, &[], &env).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("STATE_DIR /var/lib/sluice-agent is not writable"), "{stderr}");
    assert!(stderr.contains("waiting 1 s before exiting 2"), "{stderr}");
    assert!(started.elapsed() >= Duration::from_secs(1), "the final exit waited SLUICE_EXIT_DELAY_SECS");
}

#[test]
fn static_relay_in_the_image_rootfs_starts_as_65532() {
    assert!(is_root(), "this test builds a root file system and chroots into it: run it as root (CI does)");
    let dir = test_dir("dist-relay");
    let image = Dockerfile::read("relay");
    assert_eq!(image.user, Some((65532, 65532)));
    let root = rootfs_dir(dir.path());
    image.build_rootfs(&image_context("relay"), &root);
    let (agent_port, admin_port) = (free_port(), free_port());
    let (ports, leases) = (sluice_e2e::free_port_range(2), sluice_e2e::free_port_range(2));
    let agent_listen = format!("127.0.0.1:{agent_port}");
    let admin_listen = format!("127.0.0.1:{admin_port}");
    let resource_ports = format!("{}-{}", ports.0, ports.1);
    let lease_ports = format!("{}-{}", leases.0, leases.1);
    // A PostgreSQL run keeps this relay on SQLite: it is about the image's data directory.
    let env = [
        ("SLUICE_AGENT_LISTEN", agent_listen.as_str()),
        ("SLUICE_ADMIN_LISTEN", &admin_listen),
        ("SLUICE_PUBLIC_URL", "https://localhost:8443"),
        ("SLUICE_RESOURCE_PORTS", &resource_ports),
        ("SLUICE_LEASE_PORTS", &lease_ports),
    ];
    let relay = Proc::spawn(image.command(&root, &[], &env), dir.path().join("relay.log"));
    let data = root.join("var/lib/sluice");
    wait_for(Duration::from_secs(30), "the relay in the rootfs to write its admin URL", || {
        data.join("admin-url").exists().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log_text()));
    let token = data.join("admin-token").metadata().unwrap();
    assert_eq!((token.uid(), token.mode() & 0o777), (65532, 0o600));
    drop(relay);
}

/// A JWT the agent's configuration check accepts (it does not verify signatures; the
/// relay would).
fn well_formed_jwt() -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = serde_json::json!({
        "iss": "sluice", "aud": sluice_proto::identity::JWT_AUDIENCE, "jti": "t1", "iat": 1,
        "customer_id": "cus_1", "relay_url": "https://localhost:443", "ca_pin": "00",
    });
    format!("{}.{}.c2ln", b64(serde_json::json!({"alg": "ES256"})), b64(claims))
}

#[test]
fn dockerfile_parser_reads_the_lines_the_rootfs_follows() {
    let d = Dockerfile::parse(
        "FROM x\n# c\nCOPY --chown=65532:65532 --chmod=0700 state/ /var/lib/a/\nENV A=1 B=2\nUSER 65532:65532\n\
         HEALTHCHECK --interval=1s \\\n  CMD [\"a\"]\nENTRYPOINT [\"/bin/a\"]\n",
    );
    assert_eq!(d.copies.len(), 1);
    assert_eq!((d.copies[0].chown, d.copies[0].chmod), (Some((65532, 65532)), Some(0o700)));
    assert_eq!(d.env, vec![("A".into(), "1".into()), ("B".into(), "2".into())]);
    assert_eq!(d.entrypoint, vec!["/bin/a".to_owned()]);
}
