//! `sluice-agent doctor`: tells a customer, on their own, why the agent does not connect.
//!
//! It reads the same configuration as the agent (environment variables or flags) and
//! walks the path the agent takes, in order, one line per check:
//!
//! 1. configuration — every missing or malformed setting named (the agent's own parsing
//!    and [`AgentConfig::validate_settings`], run until each bad setting is found);
//! 2. registration JWT — well formed, for which relay, customer and resource, expiry;
//! 3. saved identity — in STATE_DIR, made for this NAME and relay, certificate expiry,
//!    and STATE_DIR writable by the user the check runs as;
//! 4. relay DNS, 5. relay TCP, 6. relay TLS with the CA pinned in the JWT (and what it saw
//!    instead: plain HTTP, another CA's certificate, an alert, a closed connection);
//! 7. session (with a saved identity: hello → welcome, as the agent does) or enrollment
//!    (only with `--enroll`: it is what starting the agent would do, and saves the identity);
//! 8. private service — a TCP connect to APP_HOST:APP_PORT, with the container pitfall
//!    explained (localhost inside a container is the container).
//!
//! A check that needs an earlier one that failed is skipped with the reason. The JWT and
//! keys are never printed. Every TCP connection to the relay goes through
//! [`tcp_to_relay`], so the proxy-aware dial can replace it in one place.

use std::ffi::OsString;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use clap::{Arg, ArgAction, CommandFactory, FromArgMatches};
use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use sluice_datapath::TunnelSocket;
use sluice_proto::identity::unix_now;
use sluice_proto::tls;
use sluice_proto::wire::{ALPN_CONTROL, Capabilities};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::AgentConfig;
use crate::enroll::{self, Identity, NoIdentity};
use crate::session::{self, SessionEnd, control};

/// The line `sluice-agent --help` ends with.
pub const AGENT_HELP_LINE: &str = "Commands:\n  doctor  Check the configuration, the relay and the private service, one line per \
check, with the fix for each failure (sluice-agent doctor --help)";

const ABOUT: &str = "Checks, in order, what the agent needs and prints one line per check: PASS, FAIL (with a \
`fix:` line) or SKIP (with the reason). Reads the same environment variables and flags as the agent. Exits 0 when \
nothing failed, 1 otherwise. Never prints the JWT or keys.";

const AFTER_HELP: &str = "Checks: configuration, registration JWT, saved identity (and STATE_DIR writable), relay \
DNS, relay TCP, relay TLS (with the CA pinned in the JWT), session or enrollment, private service.

Enrollment: with a saved identity in STATE_DIR the doctor opens a control session with it, as the agent does (the \
relay shows it briefly, with \"(doctor)\" after the host name). Without one, whether the relay accepts \
REGISTRATION_JWT can only be known by enrolling, so by default that check is SKIPPED: pass --enroll to enroll now. \
That is exactly what starting the agent would do: the new identity is saved in STATE_DIR and the agent started \
later on the same STATE_DIR uses it. Do not use --enroll with a throwaway STATE_DIR (a `docker run --rm` without \
the agent's volume): the identity would be lost with it.

Examples:
  docker exec <agent container> sluice-agent doctor
  APP_HOST=db APP_PORT=5432 NAME=orders-db REGISTRATION_JWT=eyJ... sluice-agent doctor --output json";

/// How long DNS, a TCP connect and a TLS handshake may each take.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(10);

// === Findings ===

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
}

/// One check's line: what it saw and, when it failed, what to do.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Verdict,
    pub saw: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn pass(check: &'static str, saw: impl Into<String>) -> Finding {
        Finding { check, status: Verdict::Pass, saw: saw.into(), fix: None }
    }
    fn fail(check: &'static str, saw: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { check, status: Verdict::Fail, saw: saw.into(), fix: Some(fix.into()) }
    }
    fn skip(check: &'static str, saw: impl Into<String>) -> Finding {
        Finding { check, status: Verdict::Skip, saw: saw.into(), fix: None }
    }
    fn passed(&self) -> bool {
        self.status == Verdict::Pass
    }

    /// The text form: `PASS  check: saw`, and `      fix: …` under a failure.
    fn render(&self) -> String {
        let word = match self.status {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        };
        let mut line = format!("{word}  {}: {}", self.check, self.saw);
        if let Some(fix) = &self.fix {
            line.push_str(&format!("\n      fix: {fix}"));
        }
        line
    }
}

const CONFIGURATION: &str = "configuration";
const JWT: &str = "registration JWT";
const IDENTITY: &str = "saved identity";
const DNS: &str = "relay DNS";
const TCP: &str = "relay TCP";
const TLS: &str = "relay TLS";
const SESSION: &str = "session";
const ENROLLMENT: &str = "enrollment";
const SERVICE: &str = "private service";

// === Entry point ===

/// What the doctor takes besides the agent's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Options {
    json: bool,
    enroll: bool,
}

/// `sluice-agent doctor [FLAGS]`: `args[0]` is `doctor`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let (config, options) = match read_config(args) {
        Ok(x) => x,
        Err(e) => e.exit(),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let findings = rt.block_on(examine(config, options));
    let text = if options.json {
        serde_json::to_string_pretty(&findings).expect("serializable")
    } else {
        findings.iter().map(Finding::render).collect::<Vec<_>>().join("\n")
    };
    // A closed pipe (`… | head`) is not the doctor's failure.
    let _ = writeln!(std::io::stdout(), "{text}");
    if findings.iter().any(|f| f.status == Verdict::Fail) { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

/// The doctor's command line: the agent's own settings (so the same environment and
/// flags work) plus `--output` and `--enroll`.
fn command() -> clap::Command {
    AgentConfig::command()
        .name("sluice-agent doctor")
        .bin_name("sluice-agent doctor")
        .about(ABOUT)
        .long_about(None)
        .after_help(AFTER_HELP)
        .arg(
            Arg::new("output")
                .long("output")
                .short('o')
                .value_parser(["text", "json"])
                .default_value("text")
                .help("text: one line per check; json: an array of {check, status, saw, fix}"),
        )
        .arg(Arg::new("enroll").long("enroll").action(ArgAction::SetTrue).help(
            "Without a saved identity, enroll now (saves the identity in STATE_DIR, as starting the agent would)",
        ))
}

/// Check 1 before anything else: the configuration, or every problem with it (each
/// setting named once, in the agent's own words). `Err` is clap's own answer (`--help`,
/// an unknown flag), printed as the agent prints it.
fn read_config(args: Vec<OsString>) -> Result<(Result<AgentConfig, Vec<String>>, Options), clap::Error> {
    read_config_with(command(), args)
}

fn read_config_with(
    mut cmd: clap::Command,
    args: Vec<OsString>,
) -> Result<(Result<AgentConfig, Vec<String>>, Options), clap::Error> {
    use clap::error::ErrorKind;
    let mut problems: Vec<String> = Vec::new();
    // Each round finds one bad setting, then accepts anything for it so the next round
    // finds the next; bounded by the number of settings.
    for _ in 0..=cmd.get_arguments().count() {
        let e = match cmd.clone().try_get_matches_from(&args) {
            Ok(m) => {
                let options = Options {
                    json: m.get_one::<String>("output").is_some_and(|o| o == "json"),
                    enroll: m.get_flag("enroll"),
                };
                if !problems.is_empty() {
                    return Ok((Err(problems), options));
                }
                let cfg = AgentConfig::from_arg_matches(&m)
                    .map_err(|e| crate::config::one_line(&e))
                    .and_then(AgentConfig::validate_settings);
                return Ok((cfg.map_err(|e| vec![e]), options));
            }
            Err(e) => e,
        };
        if !matches!(e.kind(), ErrorKind::ValueValidation | ErrorKind::MissingRequiredArgument) {
            return Err(e);
        }
        let problem = crate::config::one_line(&e);
        let Some(id) = culprit(&cmd, &e, &problem) else {
            problems.push(problem);
            break;
        };
        if !problems.contains(&problem) {
            problems.push(problem);
        }
        cmd = cmd.mut_arg(id, |a| a.required(false).value_parser(clap::builder::ValueParser::os_string()));
    }
    let options = Options { json: args.iter().any(|a| a == "--output=json" || a == "-ojson"), enroll: false };
    Ok((Err(problems), options))
}

/// The setting a clap error is about: the one whose variable the message starts with,
/// else the first one clap names.
fn culprit(cmd: &clap::Command, e: &clap::Error, message: &str) -> Option<clap::Id> {
    use clap::error::{ContextKind, ContextValue};
    let by_var = cmd.get_arguments().find(|a| {
        a.get_env().and_then(|v| v.to_str()).is_some_and(|v| {
            message.strip_prefix(v).is_some_and(|rest| rest.starts_with([' ', '=', ':']) || rest.is_empty())
        })
    });
    if let Some(a) = by_var {
        return Some(a.get_id().clone());
    }
    let named = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        Some(ContextValue::Strings(v)) => v.first()?.clone(),
        _ => return None,
    };
    let long = named.split_whitespace().next()?.trim_start_matches("--");
    cmd.get_arguments().find(|a| a.get_long() == Some(long)).map(|a| a.get_id().clone())
}

// === The checks ===

/// Runs every check in order.
async fn examine(config: Result<AgentConfig, Vec<String>>, options: Options) -> Vec<Finding> {
    let cfg = match config {
        Ok(cfg) => cfg,
        Err(problems) => {
            let mut out = vec![Finding::fail(
                CONFIGURATION,
                problems.join("; "),
                "set the variables named above (environment or flags; `sluice-agent --help` lists them all)",
            )];
            let why = "needs a usable configuration (see above)";
            for check in [JWT, IDENTITY, DNS, TCP, TLS, SESSION, SERVICE] {
                out.push(Finding::skip(check, why));
            }
            return out;
        }
    };
    let mut out = vec![Finding::pass(CONFIGURATION, describe_config(&cfg))];
    let now = unix_now();
    let writable = crate::config::check_writable(&cfg.state_dir);
    let saved = match &writable {
        Ok(()) => Some(enroll::load(&cfg)),
        Err(_) => None,
    };
    let enrolled = matches!(saved, Some(Ok(_)));
    let jwt = check_jwt(&cfg, enrolled, now);
    let jwt_usable = jwt.passed() && cfg.claims.exp.is_none_or(|exp| exp > now);
    out.push(jwt);
    out.push(check_identity(&cfg, &writable, saved.as_ref(), jwt_usable));

    let authority = cfg.relay_url.authority();
    let (dns, dns_ok) = match proxy_for(&cfg, &cfg.relay_url.host, cfg.relay_url.port) {
        // Through a proxy the agent never resolves the relay's name: the proxy does, and
        // the TCP check (CONNECT) shows whether it could.
        Some(p) => (
            Finding::skip(DNS, format!("the proxy {} resolves {} for the agent", p.describe(), cfg.relay_url.host)),
            true,
        ),
        None => {
            let dns = check_dns(&cfg.relay_url.host, cfg.relay_url.port).await;
            let ok = dns.passed();
            (dns, ok)
        }
    };
    out.push(dns);
    let tcp = if dns_ok {
        check_tcp(&cfg, &authority).await
    } else {
        Finding::skip(TCP, "needs the relay's address (relay DNS failed)")
    };
    let tcp_ok = tcp.passed();
    out.push(tcp);
    let tls = if tcp_ok {
        check_tls(&cfg, &authority).await
    } else {
        Finding::skip(TLS, "needs a TCP connection to the relay (relay TCP failed)")
    };
    let tls_ok = tls.passed();
    out.push(tls);
    out.push(match (saved, tls_ok) {
        (Some(Ok(id)), true) => check_session(&cfg, &authority, &id).await,
        (Some(Ok(_)), false) => Finding::skip(SESSION, "needs TLS with the relay (relay TLS failed)"),
        (None, _) => Finding::skip(ENROLLMENT, "needs a writable STATE_DIR to save the identity in"),
        (Some(Err(NoIdentity::Mismatch(_))), _) => {
            Finding::skip(ENROLLMENT, "the saved identity does not fit this configuration (see saved identity)")
        }
        (Some(Err(_)), _) if !jwt_usable => {
            Finding::skip(ENROLLMENT, "needs a usable REGISTRATION_JWT (see registration JWT)")
        }
        (Some(Err(_)), false) => Finding::skip(ENROLLMENT, "needs TLS with the relay (relay TLS failed)"),
        (Some(Err(_)), true) if options.enroll => check_enrollment(&cfg).await,
        (Some(Err(_)), true) => Finding::skip(
            ENROLLMENT,
            "whether the relay accepts REGISTRATION_JWT is known only by enrolling, which saves an identity: \
             the agent does that on first start; `sluice-agent doctor --enroll` does it now",
        ),
    });
    out.push(check_service(&cfg.app_host, cfg.app_port).await);
    out
}

fn describe_config(cfg: &AgentConfig) -> String {
    let name = if cfg.name.is_empty() { "(from the JWT's resource)".to_owned() } else { format!("{:?}", cfg.name) };
    format!(
        "APP_HOST={} APP_PORT={} NAME={name} STATE_DIR={} relay {}",
        cfg.app_host,
        cfg.app_port,
        cfg.state_dir.display(),
        cfg.relay_url
    )
}

/// Check 2: what the JWT is for and until when (its signature only the relay can check).
fn check_jwt(cfg: &AgentConfig, enrolled: bool, now: u64) -> Finding {
    let c = &cfg.claims;
    let mut saw = format!("for relay {}", c.relay_url);
    match &c.customer_id {
        Some(customer) => saw.push_str(&format!(", customer {customer}")),
        None => saw.push_str(", org-level (no customer)"),
    }
    if let Some(resource) = &c.resource_id {
        saw.push_str(&format!(", resource {resource}"));
    }
    saw.push_str(&format!(", id {}", c.jti));
    if sluice_proto::relay_url::RelayUrl::parse(&c.relay_url).ok().as_ref() != Some(&cfg.relay_url) {
        saw.push_str(&format!("; SLUICE_URL makes the agent dial {} instead", cfg.relay_url));
    }
    match c.exp {
        None => Finding::pass(JWT, format!("{saw}; never expires")),
        Some(exp) if exp > now => Finding::pass(JWT, format!("{saw}; expires {}", when(exp, now))),
        Some(exp) if enrolled => Finding::pass(
            JWT,
            format!(
                "{saw}; expired {}, which does not matter: this agent is enrolled (saved identity)",
                when(exp, now)
            ),
        ),
        Some(exp) => Finding::fail(
            JWT,
            format!("{saw}; expired {} and STATE_DIR holds no identity, so the agent must enroll", when(exp, now)),
            "ask the platform operator for a new registration JWT (sluice resources registration-jwt) and set \
             REGISTRATION_JWT to it",
        ),
    }
}

/// Check 3: the identity saved in STATE_DIR, and STATE_DIR writable by this user.
fn check_identity(
    cfg: &AgentConfig,
    writable: &Result<(), String>,
    saved: Option<&Result<Identity, NoIdentity>>,
    jwt_usable: bool,
) -> Finding {
    let uid = current_uid();
    let dir = cfg.state_dir.display();
    let (Ok(()), Some(saved)) = (writable, saved) else {
        let why = writable.as_ref().err().cloned().unwrap_or_default();
        return Finding::fail(
            IDENTITY,
            format!("{why} (running as uid {uid})"),
            format!(
                "make {dir} writable by uid {uid} (chown {uid} {dir}; for a Docker volume, create it owned by that \
                 uid) or point STATE_DIR at a directory it can write"
            ),
        );
    };
    match saved {
        Ok(id) => {
            let m = &id.meta;
            Finding::pass(
                IDENTITY,
                format!(
                    "agent {} of resource {} ({:?}) at {}; certificate valid until {}, renewal due from {}; STATE_DIR {dir} \
                     writable by uid {uid}",
                    m.agent_id,
                    m.resource_id,
                    m.resource_name,
                    m.relay_url,
                    when(m.not_after, unix_now()),
                    when(id.renew_at(), unix_now()),
                ),
            )
        }
        Err(NoIdentity::Missing) => Finding::skip(
            IDENTITY,
            format!("none in STATE_DIR {dir} (writable by uid {uid}): will enroll on first start"),
        ),
        Err(NoIdentity::Mismatch(why)) => Finding::fail(
            IDENTITY,
            format!("{why} (STATE_DIR {dir})"),
            "give each agent its own STATE_DIR (volume); if the change is intended, the agent enrolls afresh on \
             start with REGISTRATION_JWT and replaces this identity",
        ),
        Err(NoIdentity::Unusable(why)) if jwt_usable => Finding::skip(
            IDENTITY,
            format!("{why} (STATE_DIR {dir}): will enroll again with REGISTRATION_JWT on start"),
        ),
        Err(NoIdentity::Unusable(why)) => Finding::fail(
            IDENTITY,
            format!("{why} (STATE_DIR {dir}), and REGISTRATION_JWT cannot enroll again"),
            "ask the platform operator for a new registration JWT and set REGISTRATION_JWT to it",
        ),
    }
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Check 4: the relay's host resolves.
async fn check_dns(host: &str, port: u16) -> Finding {
    if host.parse::<IpAddr>().is_ok() {
        return Finding::pass(DNS, format!("{host} is an IP address: nothing to resolve"));
    }
    match tokio::time::timeout(NETWORK_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => {
            let mut ips: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
            ips.dedup();
            if ips.is_empty() {
                return Finding::fail(DNS, format!("{host} resolves to no address"), dns_fix(host));
            }
            Finding::pass(DNS, format!("{host} resolves to {}", ips.join(", ")))
        }
        Ok(Err(e)) => Finding::fail(DNS, format!("cannot resolve {host}: {e}"), dns_fix(host)),
        Err(_) => Finding::fail(DNS, format!("resolving {host} took longer than {NETWORK_TIMEOUT:?}"), dns_fix(host)),
    }
}

fn dns_fix(host: &str) -> String {
    format!(
        "check the relay host name {host:?} (SLUICE_URL, else the JWT's relay URL) and this host's DNS \
         (/etc/resolv.conf; in a container, the container's DNS settings)"
    )
}

/// Every TCP connection the doctor opens to the relay.
/// Goes through the proxy the agent would use (`SLUICE_PROXY`, `HTTPS_PROXY`, unless
/// `NO_PROXY` covers the relay), exactly as the agent dials.
async fn tcp_to_relay(cfg: &AgentConfig, authority: &str) -> Result<TcpStream, String> {
    match tokio::time::timeout(NETWORK_TIMEOUT, crate::egress::connect_relay(authority, cfg.proxy())).await {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("connecting to {authority} took longer than {NETWORK_TIMEOUT:?}")),
    }
}

/// The proxy the agent's relay connections to `host:port` go through, if any.
fn proxy_for<'a>(cfg: &'a AgentConfig, host: &str, port: u16) -> Option<&'a crate::egress::Proxy> {
    cfg.proxy().filter(|p| !p.bypasses(host, port))
}

/// Check 5: the relay's port accepts a TCP connection.
async fn check_tcp(cfg: &AgentConfig, authority: &str) -> Finding {
    let start = Instant::now();
    match tcp_to_relay(cfg, authority).await {
        Ok(tcp) => {
            let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| authority.to_owned());
            let (host, port) = (cfg.relay_url.host.as_str(), cfg.relay_url.port);
            let via = match proxy_for(cfg, host, port) {
                Some(p) => format!(" through the proxy {} ({peer}, CONNECT {authority} answered 2xx)", p.describe()),
                None => format!(" ({peer})"),
            };
            Finding::pass(TCP, format!("connected to {authority}{via} in {} ms", start.elapsed().as_millis()))
        }
        Err(e) => Finding::fail(
            TCP,
            e,
            format!(
                "check that the relay runs and listens on port {}, and that firewalls let this host open outbound \
                 TCP connections to it",
                cfg.relay_url.port
            ),
        ),
    }
}

/// Check 6: a TLS 1.3 handshake that trusts only the CA pinned in the JWT, as enrollment
/// does; on failure, what the server sent instead.
async fn check_tls(cfg: &AgentConfig, authority: &str) -> Finding {
    let server_name = match tls::server_name_of(&cfg.relay_url.host) {
        Ok(n) => n,
        Err(e) => return Finding::fail(TLS, e.to_string(), "fix the relay host name in SLUICE_URL"),
    };
    let pinned = match tls::agent_enroll_config(&cfg.claims.ca_pin) {
        Ok(c) => Arc::new(c),
        Err(e) => return Finding::fail(TLS, e.to_string(), "ask the platform operator for a new registration JWT"),
    };
    let tcp = match tcp_to_relay(cfg, authority).await {
        Ok(tcp) => tcp,
        Err(e) => return Finding::fail(TLS, e, "see relay TCP"),
    };
    let recorded = Recorded::new(tcp);
    let heard = recorded.heard.clone();
    let handshake = TlsConnector::from(pinned).connect(server_name.clone(), recorded);
    let err = match tokio::time::timeout(NETWORK_TIMEOUT, handshake).await {
        Ok(Ok(mut tls)) => {
            close(&mut tls).await;
            let conn = tls.get_ref().1;
            let version = conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
            let chain = conn.peer_certificates().map(<[CertificateDer]>::to_vec).unwrap_or_default();
            return Finding::pass(
                TLS,
                format!("{} with {}; the pinned CA vouches for it", version.replace('_', "."), describe_chain(&chain)),
            );
        }
        Ok(Err(e)) => e,
        Err(_) => {
            return Finding::fail(
                TLS,
                format!("no TLS answer from {authority} in {NETWORK_TIMEOUT:?}"),
                "make sure the relay's agent port is reached directly (no proxy or load balancer that waits for \
                 something else)",
            );
        }
    };
    let heard = heard.lock().clone();
    let fix_port = "point SLUICE_URL (or the JWT's relay URL) at the relay's agent port; anything between this host \
                    and the relay must pass TLS through untouched (TCP passthrough, no TLS termination)";
    if heard.starts_with(b"HTTP/") {
        let first_line = String::from_utf8_lossy(&heard);
        let first_line = first_line.lines().next().unwrap_or_default();
        return Finding::fail(
            TLS,
            format!("{authority} answered the TLS hello in plain HTTP ({first_line:?}): not a TLS port"),
            fix_port,
        );
    }
    let rustls_err = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).cloned();
    match rustls_err {
        Some(rustls::Error::General(_) | rustls::Error::InvalidCertificate(_)) => {
            let why = rustls_err.map(|e| e.to_string()).unwrap_or_default();
            let seen = match what_the_server_shows(cfg, authority, server_name).await {
                Some((version, chain)) => format!("{version} with {}", describe_chain(&chain)),
                None => "a certificate this check could not record".into(),
            };
            Finding::fail(
                TLS,
                format!("{seen}, not vouched for by the CA pinned in REGISTRATION_JWT ({why})"),
                "point SLUICE_URL at the relay that issued REGISTRATION_JWT (or ask its operator for a JWT of \
                 this relay); a TLS-inspecting proxy or firewall must let this connection through unchanged",
            )
        }
        Some(rustls::Error::AlertReceived(alert)) => Finding::fail(
            TLS,
            format!(
                "{authority} refused the handshake with the TLS alert {alert:?} (the relay speaks TLS 1.3 only; \
                 is this the relay?)"
            ),
            fix_port,
        ),
        Some(other) if !heard.is_empty() && heard[0] != 0x16 && heard[0] != 0x15 => Finding::fail(
            TLS,
            format!(
                "{authority} does not speak TLS: it answered {:?} ({other})",
                String::from_utf8_lossy(&heard[..heard.len().min(40)])
            ),
            fix_port,
        ),
        Some(other) => Finding::fail(TLS, format!("TLS with {authority} failed: {other}"), fix_port),
        None if heard.is_empty() => Finding::fail(
            TLS,
            format!("{authority} closed the connection without answering the TLS hello ({err})"),
            fix_port,
        ),
        None => Finding::fail(TLS, format!("TLS with {authority} failed: {err}"), fix_port),
    }
}

/// A second handshake, trusting anything, only to record what the server presents (its
/// TLS version and certificate chain); nothing is sent over it.
async fn what_the_server_shows(
    cfg: &AgentConfig,
    authority: &str,
    server_name: ServerName<'static>,
) -> Option<(String, Vec<CertificateDer<'static>>)> {
    let recorder = Arc::new(ChainRecorder { seen: Mutex::new(Vec::new()), provider: tls::provider() });
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let tcp = tcp_to_relay(cfg, authority).await.ok()?;
    let handshake = TlsConnector::from(Arc::new(config)).connect(server_name, tcp);
    let tls = tokio::time::timeout(NETWORK_TIMEOUT, handshake).await.ok()?.ok()?;
    let version = tls.get_ref().1.protocol_version().map(|v| format!("{v:?}").replace('_', ".")).unwrap_or_default();
    let chain = recorder.seen.lock().clone();
    Some((version, chain))
}

/// Ends a TLS connection politely (close_notify), so the relay logs a clean close.
async fn close(tls: &mut (impl AsyncWrite + Unpin)) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(Duration::from_secs(2), tls.shutdown()).await;
}

/// "a certificate for SUBJECT issued by ISSUER".
fn describe_chain(chain: &[CertificateDer<'_>]) -> String {
    let Some(leaf) = chain.first() else { return "no certificate".into() };
    match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, cert)) => format!("a certificate for \"{}\" issued by \"{}\"", cert.subject(), cert.issuer()),
        Err(_) => "an unreadable certificate".into(),
    }
}

/// Check 7 with a saved identity: a control session, hello → welcome, as the agent opens it.
async fn check_session(cfg: &AgentConfig, authority: &str, id: &Identity) -> Finding {
    let fail = |saw: String| {
        Finding::fail(
            SESSION,
            saw,
            "see the lines above; if the relay refuses the certificate, the agent enrolls again on start with REGISTRATION_JWT",
        )
    };
    let server_name = match tls::server_name_of(&cfg.relay_url.host) {
        Ok(n) => n,
        Err(e) => return fail(e.to_string()),
    };
    let control_cfg = match session::client_config(id, ALPN_CONTROL) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let tcp = match tcp_to_relay(cfg, authority).await {
        Ok(tcp) => tcp,
        Err(e) => return fail(e),
    };
    let handshake = TlsConnector::from(control_cfg).connect(server_name, TunnelSocket::new(tcp));
    let mut tunnel = match tokio::time::timeout(NETWORK_TIMEOUT, handshake).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return fail(format!("mutual TLS with the saved identity failed: {e}")),
        Err(_) => return fail(format!("mutual TLS with {authority} took longer than {NETWORK_TIMEOUT:?}")),
    };
    let hostname = format!("{} (doctor)", crate::hostname());
    let welcome = control::hello(&mut tunnel, hostname, Capabilities::default()).await;
    close(&mut tunnel).await;
    match welcome {
        Ok(w) => {
            let relay = if w.relay_id.is_empty() { String::new() } else { format!(" relay {},", w.relay_id) };
            Finding::pass(
                SESSION,
                format!(
                    "the relay welcomed agent {} of resource {} ({:?}):{relay} session {}, heartbeat {:?}",
                    id.meta.agent_id, id.meta.resource_id, id.meta.resource_name, w.session_id, w.heartbeat
                ),
            )
        }
        Err(SessionEnd::Revoked(why)) => Finding::fail(
            SESSION,
            why,
            "the agent enrolls again with REGISTRATION_JWT on start; if that JWT was revoked or the resource \
             rotated, ask the platform operator for a new one",
        ),
        Err(SessionEnd::Lost(why) | SessionEnd::Ended(why)) => fail(why),
        Err(other) => fail(format!("{other:?}")),
    }
}

/// Check 7 without an identity, with `--enroll`: the agent's own enrollment.
async fn check_enrollment(cfg: &AgentConfig) -> Finding {
    match enroll::enroll(cfg).await {
        Ok(id) => Finding::pass(
            ENROLLMENT,
            format!(
                "enrolled as agent {} of resource {} ({:?}); the identity is saved in STATE_DIR {}",
                id.meta.agent_id,
                id.meta.resource_id,
                id.meta.resource_name,
                cfg.state_dir.display()
            ),
        ),
        Err(enroll::EnrollError::Rejected(r)) => Finding::fail(
            ENROLLMENT,
            format!("the relay refused REGISTRATION_JWT: {}", r.message),
            "ask the platform operator for a new registration JWT (sluice resources registration-jwt) and set \
             REGISTRATION_JWT to it",
        ),
        Err(e) => Finding::fail(ENROLLMENT, e.to_string(), "see the relay checks above"),
    }
}

/// Check 8: a TCP connect to the private service (the agent's own probe).
async fn check_service(host: &str, port: u16) -> Finding {
    let target = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let health = crate::service::ServiceHealth::new(target.clone());
    health.probe().await;
    let state = health.subscribe().borrow().clone();
    if state.reachable == Some(true) {
        return Finding::pass(SERVICE, format!("{target} accepts TCP connections"));
    }
    let why = state.error.unwrap_or_else(|| format!("cannot connect to {target}"));
    let hint = container_hint(host, detect_container(Path::new("/"), std::env::var("container").ok().as_deref()));
    match hint {
        Some(hint) => Finding::fail(SERVICE, format!("{why}; {hint}"), container_fix(port)),
        None => Finding::fail(
            SERVICE,
            why,
            format!(
                "check that the service runs and listens on {target} as seen from this host (APP_HOST, APP_PORT), \
                 and that no firewall blocks it"
            ),
        ),
    }
}

// === The container pitfall ===

/// Why this process seems to run in a container, if it does: the marker files Docker
/// and Podman create, the `container` variable systemd-nspawn, Podman and LXC set, or a
/// container runtime in PID 1's cgroup (cgroup v1).
fn detect_container(root: &Path, container_var: Option<&str>) -> Option<String> {
    for marker in [".dockerenv", "run/.containerenv"] {
        if root.join(marker).exists() {
            return Some(format!("/{marker} exists"));
        }
    }
    if let Some(v) = container_var.filter(|v| !v.is_empty()) {
        return Some(format!("container={v} is set"));
    }
    let cgroup = std::fs::read_to_string(root.join("proc/1/cgroup")).unwrap_or_default();
    ["docker", "kubepods", "containerd", "libpod", "lxc"]
        .into_iter()
        .find(|hint| cgroup.contains(hint))
        .map(|hint| format!("PID 1's cgroup names {hint}"))
}

/// The explanation for a failed connect to a loopback APP_HOST from inside a container.
fn container_hint(app_host: &str, in_container: Option<String>) -> Option<String> {
    let host = app_host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
    let evidence = in_container?;
    loopback.then(|| {
        format!(
            "this agent runs in a container ({evidence}), where {app_host} is the container itself, not the host \
             the service runs on"
        )
    })
}

fn container_fix(port: u16) -> String {
    format!(
        "set APP_HOST=host.docker.internal (on Linux also add extra_hosts: [\"host.docker.internal:host-gateway\"] \
         to the agent's compose service, or --add-host=host.docker.internal:host-gateway to docker run) and make \
         the service listen on an address the container can reach (not only 127.0.0.1) on port {port}; or use the \
         service's container name on a shared network"
    )
}

// === Time ===

/// `2026-12-01 07:00:00 UTC (in 3d 2h)` or `(… ago)`.
fn when(ts: u64, now: u64) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp(ts.min(i64::MAX as u64) as i64)
        .map(|d| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                d.year(),
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute(),
                d.second()
            )
        })
        .unwrap_or_else(|_| format!("at {ts} (seconds since the epoch)"));
    if ts > now { format!("{date} (in {})", span(ts - now)) } else { format!("{date} ({} ago)", span(now - ts)) }
}

/// A duration in its two largest units: `3d 2h`, `5m 3s`, `42s`.
fn span(secs: u64) -> String {
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let parts: Vec<String> = units
        .iter()
        .scan(secs, |left, (size, unit)| {
            let n = *left / size;
            *left %= size;
            Some((n, unit))
        })
        .skip_while(|(n, _)| *n == 0)
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if parts.is_empty() { "0s".into() } else { parts.join(" ") }
}

// === What the server said ===

/// A TCP stream that keeps the first bytes the server sent, to tell what answered a TLS
/// hello when the handshake fails (`HTTP/1.1 400 …`, an alert, nothing).
struct Recorded {
    tcp: TcpStream,
    heard: Arc<Mutex<Vec<u8>>>,
}

/// How many of the server's first bytes are kept.
const HEARD_MAX: usize = 256;

impl Recorded {
    fn new(tcp: TcpStream) -> Recorded {
        Recorded { tcp, heard: Arc::new(Mutex::new(Vec::new())) }
    }
}

impl AsyncRead for Recorded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let mut heard = self.heard.lock();
            let room = HEARD_MAX.saturating_sub(heard.len());
            let new = &buf.filled()[before..];
            heard.extend_from_slice(&new[..new.len().min(room)]);
        }
        polled
    }
}

impl AsyncWrite for Recorded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A verifier that trusts any server and records its chain: used only to describe a
/// server that failed the real check, over a connection that carries nothing.
#[derive(Debug)]
struct ChainRecorder {
    seen: Mutex<Vec<CertificateDer<'static>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for ChainRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = self.seen.lock();
        seen.push(end_entity.clone().into_owned());
        seen.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_in_a_container_gets_the_hint() {
        let inside = || Some("/.dockerenv exists".to_owned());
        for host in ["localhost", "LOCALHOST", "127.0.0.1", "127.0.1.1", "::1", "[::1]", "0.0.0.0", "db.localhost"] {
            let hint = container_hint(host, inside()).unwrap_or_else(|| panic!("{host} should get the hint"));
            assert!(hint.contains("container") && hint.contains(host), "{hint}");
        }
        for host in ["db.internal", "10.0.0.5", "host.docker.internal"] {
            assert_eq!(container_hint(host, inside()), None, "{host} is not the container itself");
        }
        assert_eq!(container_hint("localhost", None), None, "outside a container localhost is the host");
        assert!(container_fix(5432).contains("host.docker.internal:host-gateway"));
    }

    #[test]
    fn containers_are_recognised_by_their_markers() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert_eq!(detect_container(r, None), None);
        assert_eq!(detect_container(r, Some("")), None);
        assert_eq!(detect_container(r, Some("podman")).as_deref(), Some("container=podman is set"));
        std::fs::create_dir_all(r.join("proc/1")).unwrap();
        std::fs::write(r.join("proc/1/cgroup"), "0::/\n").unwrap();
        assert_eq!(detect_container(r, None), None, "cgroup v2 on a host says nothing");
        std::fs::write(r.join("proc/1/cgroup"), "12:pids:/docker/0123abcd\n").unwrap();
        assert_eq!(detect_container(r, None).as_deref(), Some("PID 1's cgroup names docker"));
        std::fs::create_dir_all(r.join("run")).unwrap();
        std::fs::write(r.join("run/.containerenv"), "").unwrap();
        assert_eq!(detect_container(r, None).as_deref(), Some("/run/.containerenv exists"));
        std::fs::write(r.join(".dockerenv"), "").unwrap();
        assert_eq!(detect_container(r, None).as_deref(), Some("/.dockerenv exists"));
    }

    #[test]
    fn spans_and_dates_read_like_people_write_them() {
        assert_eq!(span(0), "0s");
        assert_eq!(span(42), "42s");
        assert_eq!(span(3 * 86_400 + 2 * 3_600 + 59), "3d 2h");
        assert_eq!(span(86_400 + 5), "1d");
        assert_eq!(span(303), "5m 3s");
        assert_eq!(when(0, 60), "1970-01-01 00:00:00 UTC (1m ago)");
        assert_eq!(when(60, 60), "1970-01-01 00:01:00 UTC (0s ago)", "expired at exp itself");
        assert_eq!(when(1_800_000_000, 1_799_996_400), "2027-01-15 08:00:00 UTC (in 1h)");
    }

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn every_bad_setting_is_named_once() {
        let cmd = sluice_runtime::ignoring_env(command());
        let (cfg, options) =
            read_config_with(cmd, args(&["doctor", "--app-port", "70000", "--counter", "kernel", "-o", "json"]))
                .unwrap();
        let problems = cfg.unwrap_err();
        for var in ["APP_HOST is not set", "APP_PORT=\"70000\"", "REGISTRATION_JWT is not set", "SLUICE_COUNTER="] {
            assert_eq!(problems.iter().filter(|p| p.contains(var)).count(), 1, "{var} once in {problems:?}");
        }
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(options.json);
    }

    #[test]
    fn help_is_clap_s_own_answer() {
        let e = read_config_with(command(), args(&["doctor", "--help"])).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        let help = e.to_string();
        assert!(help.contains("--enroll") && help.contains("APP_HOST") && help.contains("SKIPPED"), "{help}");
    }

    #[test]
    fn findings_render_as_one_line_and_a_fix() {
        let f = Finding::fail(TCP, "cannot connect to relay:443: refused", "start the relay");
        assert_eq!(f.render(), "FAIL  relay TCP: cannot connect to relay:443: refused\n      fix: start the relay");
        assert_eq!(Finding::skip(DNS, "x").render(), "SKIP  relay DNS: x");
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["status"], "FAIL");
        assert_eq!(json["check"], "relay TCP");
    }
}
