//! The tunnels under test and how to start each on loopback, in the same topology:
//! client → public port → tunnel → private backend (127.0.0.1 only).
//!
//! A [`Tunnel`] owns the processes of both ends (killed on drop) and knows which of them
//! is the private-side end, the one that plays Sluice's agent: the stunnel server, the
//! rathole client, `bore local`, `sluice-agent`. socat is a single process (one hop).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::procs::{self, Child};
use super::sluice;

/// A tunnel compared in the benchmark.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Peer {
    Direct,
    Socat,
    Stunnel,
    Rathole,
    Bore,
    Sluice,
}

impl Peer {
    pub const ALL: [Peer; 6] = [Peer::Direct, Peer::Socat, Peer::Stunnel, Peer::Rathole, Peer::Bore, Peer::Sluice];

    /// The name on the command line (`--peers`).
    pub fn key(self) -> &'static str {
        match self {
            Peer::Direct => "direct",
            Peer::Socat => "socat",
            Peer::Stunnel => "stunnel",
            Peer::Rathole => "rathole",
            Peer::Bore => "bore",
            Peer::Sluice => "sluice",
        }
    }

    /// The name in the table.
    pub fn label(self) -> &'static str {
        match self {
            Peer::Direct => "iperf3 direct (no tunnel)",
            Peer::Socat => "socat, one hop",
            Peer::Stunnel => "stunnel pair",
            Peer::Rathole => "rathole, TLS transport",
            Peer::Bore => "bore",
            Peer::Sluice => "Sluice relay + agent",
        }
    }

    /// What protects the bytes between the two ends.
    pub fn security(self) -> &'static str {
        match self {
            Peer::Direct => "none (the limit)",
            Peer::Socat => "none (plain TCP)",
            Peer::Stunnel => "TLS 1.3 only, client certs",
            Peer::Rathole => "TLS, server cert + token",
            Peer::Bore => "**none: no encryption**",
            Peer::Sluice => "TLS 1.3, client certs; AES-128-GCM first (its config)",
        }
    }

    pub fn from_key(key: &str) -> Result<Peer> {
        Peer::ALL.into_iter().find(|p| p.key() == key).with_context(|| {
            let keys: Vec<&str> = Peer::ALL.iter().map(|p| p.key()).collect();
            format!("unknown peer {key:?}; known: {}", keys.join(", "))
        })
    }
}

/// Where the programs and certificates are.
pub struct Setup {
    pub rathole: PathBuf,
    pub bore: PathBuf,
    /// Directory holding `sluice` and `sluice-agent`.
    pub sluice_bins: PathBuf,
    /// Throwaway CA, server and client certificates (see [`make_certs`]).
    pub certs: PathBuf,
}

/// A running tunnel: its public port and the processes of both ends.
pub struct Tunnel {
    pub public_port: u16,
    pub procs: Vec<Child>,
    /// Index in `procs` of the private-side end (the agent's role).
    pub agent: Option<usize>,
    /// The TLS port between the ends, for [`tls_probe`] (peers whose TLS is OpenSSL's).
    pub tls_port: Option<u16>,
}

impl Tunnel {
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Child::pid).collect()
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.map(|i| self.procs[i].pid())
    }
}

/// Starts `peer` forwarding a fresh public port to 127.0.0.1:`backend`; logs go to `dir`.
/// Returns once the public port listens (the caller then checks an echo end to end).
pub fn start(peer: Peer, setup: &Setup, backend: u16, dir: &Path) -> Result<Tunnel> {
    std::fs::create_dir_all(dir)?;
    match peer {
        Peer::Direct => Ok(Tunnel { public_port: backend, procs: Vec::new(), agent: None, tls_port: None }),
        Peer::Socat => socat(backend, dir),
        Peer::Stunnel => stunnel(setup, backend, dir),
        Peer::Rathole => rathole(setup, backend, dir),
        Peer::Bore => bore(setup, backend, dir),
        Peer::Sluice => sluice::start(&setup.sluice_bins, backend, dir),
    }
}

/// Waits until 127.0.0.1:`port` listens, failing early when one of `procs` exits.
fn wait_listening(port: u16, procs: &mut [Child]) -> Result<()> {
    procs::wait_for(Duration::from_secs(30), &format!("127.0.0.1:{port} to listen"), || {
        for p in procs.iter_mut() {
            p.check_running()?;
        }
        Ok(procs::is_listening(port).then_some(()))
    })
}

fn socat(backend: u16, dir: &Path) -> Result<Tunnel> {
    let public = procs::free_port()?;
    let mut cmd = Command::new("socat");
    cmd.arg(format!("TCP-LISTEN:{public},bind=127.0.0.1,reuseaddr,fork,backlog=1024"))
        .arg(format!("TCP:127.0.0.1:{backend}"));
    let mut procs = vec![Child::spawn("socat", cmd, &dir.join("socat.log"))?];
    wait_listening(public, &mut procs)?;
    Ok(Tunnel { public_port: public, procs, agent: Some(0), tls_port: None })
}

/// Generates a throwaway CA and a server (`localhost`, 127.0.0.1) and a client
/// certificate signed by it, with openssl, into `dir`; plus `server.p12` for rathole.
pub fn make_certs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(
        dir,
        &["req", "-x509"],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench-ca"],
    )?;
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    for who in ["server", "client"] {
        let (key, csr, pem, ext) =
            (format!("{who}.key"), format!("{who}.csr"), format!("{who}.pem"), format!("{who}.ext"));
        let subj = if who == "server" { "/CN=localhost" } else { "/CN=bench-client" };
        openssl(dir, &["req"], &ec, &["-keyout", &key, "-out", &csr, "-subj", subj])?;
        let sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", &ext];
        openssl(dir, &["x509", "-req", "-in", &csr, "-out", &pem], &sign, &[])?;
    }
    let p12 = ["-inkey", "server.key", "-in", "server.pem", "-certfile", "ca.pem", "-passout", "pass:bench"];
    openssl(dir, &["pkcs12", "-export", "-out", "server.p12"], &p12, &[])
}

fn openssl(dir: &Path, a: &[&str], b: &[&str], c: &[&str]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir).args(a).args(b).args(c);
    procs::run_within("openssl", cmd, Duration::from_secs(30))?.ok(&format!("openssl {}", a.join(" ")))?;
    Ok(())
}

/// stunnel client (public side, TLS initiator) → stunnel server (private side) →
/// backend; TLS 1.3 only, both sides verify the other's certificate.
fn stunnel(setup: &Setup, backend: u16, dir: &Path) -> Result<Tunnel> {
    let (public, tls) = (procs::free_port()?, procs::free_port()?);
    let c = |f: &str| setup.certs.join(f).display().to_string();
    let common = format!(
        "foreground = yes\npid =\ndebug = 4\n[bench]\nCAfile = {}\nverifyChain = yes\nsslVersionMin = TLSv1.3\n",
        c("ca.pem")
    );
    let server = format!(
        "{common}accept = 127.0.0.1:{tls}\nconnect = 127.0.0.1:{backend}\ncert = {}\nkey = {}\n",
        c("server.pem"),
        c("server.key")
    );
    let client = format!(
        "{common}client = yes\naccept = 127.0.0.1:{public}\nconnect = 127.0.0.1:{tls}\ncheckHost = localhost\n\
         cert = {}\nkey = {}\n",
        c("client.pem"),
        c("client.key")
    );
    let mut procs = Vec::new();
    for (who, conf) in [("server", server), ("client", client)] {
        let path = dir.join(format!("stunnel-{who}.conf"));
        std::fs::write(&path, conf)?;
        let mut cmd = Command::new("stunnel4");
        cmd.arg(&path);
        procs.push(Child::spawn(&format!("stunnel {who}"), cmd, &dir.join(format!("stunnel-{who}.log")))?);
    }
    wait_listening(tls, &mut procs)?;
    wait_listening(public, &mut procs)?;
    Ok(Tunnel { public_port: public, procs, agent: Some(0), tls_port: Some(tls) })
}

/// rathole server (public side) ← rathole client (private side, dials out), TLS
/// transport (native-tls: OpenSSL here); the client authenticates with a token.
fn rathole(setup: &Setup, backend: u16, dir: &Path) -> Result<Tunnel> {
    let (public, control) = (procs::free_port()?, procs::free_port()?);
    let c = |f: &str| setup.certs.join(f).display().to_string();
    let token = format!("bench-{}", std::process::id());
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.transport]\ntype = \"tls\"\n\
         [server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n\
         [server.services.bench]\ntoken = \"{token}\"\nbind_addr = \"127.0.0.1:{public}\"\n",
        c("server.p12")
    );
    let client = format!(
        "[client]\nremote_addr = \"127.0.0.1:{control}\"\n[client.transport]\ntype = \"tls\"\n\
         [client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n\
         [client.services.bench]\ntoken = \"{token}\"\nlocal_addr = \"127.0.0.1:{backend}\"\n",
        c("ca.pem")
    );
    let mut procs = Vec::new();
    for (who, flag, conf) in [("client", "--client", client), ("server", "--server", server)] {
        let path = dir.join(format!("rathole-{who}.toml"));
        std::fs::write(&path, conf)?;
        let mut cmd = Command::new(&setup.rathole);
        cmd.arg(flag).arg(&path).env("RUST_LOG", "warn");
        procs.push(Child::spawn(&format!("rathole {who}"), cmd, &dir.join(format!("rathole-{who}.log")))?);
    }
    wait_listening(public, &mut procs)?;
    Ok(Tunnel { public_port: public, procs, agent: Some(0), tls_port: Some(control) })
}

/// `bore server` (public side, control port 7835) ← `bore local` (private side, dials
/// out). bore has no encryption: the control and data connections are plain TCP.
fn bore(setup: &Setup, backend: u16, dir: &Path) -> Result<Tunnel> {
    const CONTROL_PORT: u16 = 7835;
    if procs::is_listening(CONTROL_PORT) {
        bail!("bore's fixed control port 127.0.0.1:{CONTROL_PORT} is taken");
    }
    let public = procs::free_port()?;
    let p = public.to_string();
    let mut server = Command::new(&setup.bore);
    server.args(["server", "--bind-addr", "127.0.0.1", "--bind-tunnels", "127.0.0.1"]);
    server.args(["--min-port", &p, "--max-port", &p]).env("RUST_LOG", "warn");
    let mut procs = vec![Child::spawn("bore server", server, &dir.join("bore-server.log"))?];
    wait_listening(CONTROL_PORT, &mut procs)?;
    let mut local = Command::new(&setup.bore);
    local.args(["local", &backend.to_string(), "--local-host", "127.0.0.1", "--to", "127.0.0.1", "--port", &p]);
    local.env("RUST_LOG", "warn");
    procs.insert(0, Child::spawn("bore local", local, &dir.join("bore-local.log"))?);
    wait_listening(public, &mut procs)?;
    Ok(Tunnel { public_port: public, procs, agent: Some(0), tls_port: None })
}

/// The TLS version and cipher suite the server end at 127.0.0.1:`port` negotiates with
/// an OpenSSL client (`openssl s_client`, with the client certificate): what the
/// OpenSSL-based client ends of stunnel and rathole get with their default settings.
pub fn tls_probe(setup: &Setup, port: u16) -> Result<String> {
    let c = |f: &str| setup.certs.join(f);
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-brief", "-servername", "localhost", "-connect", &format!("127.0.0.1:{port}")]);
    cmd.arg("-CAfile").arg(c("ca.pem")).arg("-cert").arg(c("client.pem")).arg("-key").arg(c("client.key"));
    let done = procs::run_within("openssl s_client", cmd, Duration::from_secs(10))?;
    let text = format!("{}\n{}", done.stdout, done.stderr);
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    match (field("Protocol version:"), field("Ciphersuite:")) {
        (Some(version), Some(suite)) => Ok(format!("{version} {suite}")),
        _ => bail!("openssl s_client saw no handshake: {}", text.lines().last().unwrap_or("no output")),
    }
}
