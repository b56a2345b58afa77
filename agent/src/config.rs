//! The agent's configuration: one typed struct, parsed by clap from flags or environment
//! variables (defaults written once, in the attributes below), then checked for what
//! involves several settings at once ([`AgentConfig::validate`]). Every problem is
//! reported as one line naming the variable and the fix, before the agent touches the
//! network.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use sluice_datapath::{DataPathMode, KtlsEngine};
use sluice_proto::identity::{RegistrationClaims, unix_now};
use sluice_proto::relay_url::RelayUrl;
use sluice_runtime::{LogArgs, Secret, blank_or};

use crate::egress::Proxy;
use crate::meter::{Counter, CounterMode};

/// The state directory when none is given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sluice-agent";

/// Runs next to a private service and makes it reachable from the platform through the
/// Sluice relay. Dials out only (no inbound port): mutual TLS to the relay, on 443.
///
/// Typical use (Docker or systemd sets these):
///   APP_HOST=db.internal APP_PORT=5432 NAME=orders-db REGISTRATION_JWT=eyJ… sluice-agent
#[derive(Debug, Clone, Parser)]
#[command(name = "sluice-agent", version = crate::LONG_VERSION, after_help = crate::doctor::AGENT_HELP_LINE)]
pub struct AgentConfig {
    /// Host name or IP of the private service.
    #[arg(long, env = "APP_HOST", value_parser = required("APP_HOST"))]
    pub app_host: String,
    /// TCP port of the private service.
    #[arg(long, env = "APP_PORT", value_parser = parse_app_port)]
    pub app_port: u16,
    /// Resource name; agents of one customer with the same NAME share the resource.
    /// Optional when the registration JWT was issued for one resource.
    #[arg(long, env = "NAME", default_value = "", hide_default_value = true, value_parser = parse_name)]
    pub name: String,
    /// Registration JWT from the platform operator.
    #[arg(long = "registration-jwt", env = "REGISTRATION_JWT", hide_env_values = true,
          value_parser = required_secret("REGISTRATION_JWT"))]
    registration_jwt: Secret<String>,
    /// The registration JWT's claims (decoded by [`AgentConfig::validate`]).
    #[arg(skip)]
    pub claims: RegistrationClaims,
    /// Where the agent keeps its key and certificate.
    #[arg(long, env = "STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Relay URL (https://host:port). Default: the one in the registration JWT.
    #[arg(long = "sluice-url", env = "SLUICE_URL", default_value = "", hide_default_value = true,
          value_parser = parse_sluice_url)]
    sluice_url: std::option::Option<RelayUrl>,
    /// The relay to dial: `--sluice-url`, else the JWT's (set by [`AgentConfig::validate`]).
    #[arg(skip = RelayUrl { host: String::new(), port: 443 })]
    pub relay_url: RelayUrl,
    /// In a cluster of relays (they tell the agent who they are), the most relays to
    /// hold a control session and a pool of data connections to at once; each agent
    /// picks its own subset of a larger cluster (by hashing its identity), so the load
    /// spreads. A single relay is a cluster of one.
    #[arg(long = "max-relays", env = "SLUICE_MAX_RELAYS", default_value = "4",
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub max_relays: u32,
    /// Longest wait between reconnection attempts, in seconds.
    #[arg(long = "reconnect-max-secs", env = "SLUICE_RECONNECT_MAX_SECS", default_value = "30",
          value_parser = parse_reconnect_max)]
    pub reconnect_max: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464). Off by
    /// default: the agent opens no port unless asked.
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "", hide_default_value = true,
          value_parser = parse_metrics_listen)]
    pub metrics_listen: std::option::Option<SocketAddr>,
    /// How stream bytes are counted: auto (the sock_ops eBPF program, else cgroup_skb,
    /// else user space), sock_ops or cgroup_skb (that program, else user space), or
    /// userspace.
    #[arg(long, env = "SLUICE_COUNTER", default_value = "auto", value_parser = parse_counter)]
    pub counter: CounterMode,
    /// How stream bytes move: auto (kernel TLS + splice when the kernel has TLS, else
    /// user-space rustls) or userspace.
    #[arg(long, env = "SLUICE_DATA_PATH", default_value = "auto", value_parser = blank_or::<DataPathMode>("SLUICE_DATA_PATH"))]
    pub data_path: DataPathMode,
    /// Kernel-TLS engine: splice (the default). Builds with the cargo feature
    /// bench-engines also take uring, threads and copy, for benchmarks.
    #[arg(long, env = "SLUICE_KTLS_ENGINE", default_value = "splice", hide_short_help = true,
          value_parser = blank_or::<KtlsEngine>("SLUICE_KTLS_ENGINE"))]
    pub ktls_engine: KtlsEngine,
    /// Seconds between checks that APP_HOST:APP_PORT accepts TCP connections (a connect
    /// and close, skipped while streams show the service up); 0 checks only at start.
    /// The result is shown by `sluice resources list` and `sluice agents list`.
    #[arg(long = "service-check-secs", env = "SLUICE_SERVICE_CHECK_SECS", default_value = "30",
          value_parser = parse_service_check)]
    pub service_check: std::option::Option<Duration>,
    /// Seconds a stopping agent (SIGTERM, Ctrl-C) lets its streams under way finish: it
    /// ends its session at once, so the relay sends it no new stream, waits for the
    /// running ones up to this long, then exits 0, cutting what still runs. 0: no wait.
    /// A second signal exits at once.
    #[arg(long = "drain-timeout-secs", env = "SLUICE_DRAIN_TIMEOUT_SECS", default_value = "30",
          value_parser = parse_drain_timeout)]
    pub drain_timeout: Duration,
    /// HTTP forward proxy to reach the relay through (HTTP CONNECT; the TLS to the relay
    /// runs end to end through it): http://[user:password@]host:port. `none` (or blank)
    /// dials the relay directly even when HTTPS_PROXY is set. Default: https_proxy, else
    /// HTTPS_PROXY; no_proxy/NO_PROXY lists hosts dialed directly either way.
    #[arg(long = "proxy", env = "SLUICE_PROXY", hide_env_values = true)]
    proxy_setting: Option<String>,
    /// The proxy in use (from `--proxy` and the environment, set by [`AgentConfig::load`]).
    #[arg(skip)]
    proxy: std::option::Option<Proxy>,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Why there is no configuration to run with.
#[derive(Debug)]
pub enum ConfigError {
    /// Not a configuration problem clap reports in its own words (`--help`, `--version`,
    /// an unknown flag): print it with [`clap::Error::exit`].
    Clap(clap::Error),
    /// A setting is missing or wrong: one line naming it and the fix.
    Invalid(String),
}

impl AgentConfig {
    /// Reads the flags and the environment and checks them.
    pub fn load() -> Result<AgentConfig, ConfigError> {
        Self::load_from(Self::command(), std::env::args_os(), &|var| std::env::var(var).ok())
    }

    /// A configuration made in code (the quickstart's agent): every setting but these
    /// at its default, each checked as its flag would be; the environment is not read.
    /// Change fields, then [`validate`](Self::validate).
    pub fn new(app_host: &str, app_port: u16, name: &str, registration_jwt: &str) -> Result<AgentConfig, String> {
        let port = app_port.to_string();
        let flags = [
            "sluice-agent",
            "--app-host",
            app_host,
            "--app-port",
            &port,
            "--name",
            name,
            "--registration-jwt",
            registration_jwt,
        ];
        let m = sluice_runtime::ignoring_env(Self::command()).try_get_matches_from(flags).map_err(|e| one_line(&e))?;
        Self::from_arg_matches(&m).map_err(|e| one_line(&e))
    }

    /// [`load`](Self::load) from `args` alone (the environment is not read): the entry
    /// point of the `agent_config` fuzz target (`fuzz/`). `args[0]` is the program name.
    #[doc(hidden)]
    pub fn load_from_flags<I, T>(args: I) -> Result<AgentConfig, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::load_from(sluice_runtime::ignoring_env(Self::command()), args, &|_| None)
    }

    /// Parses `args` with `cmd`; `env` looks up the proxy variables clap does not read
    /// (`HTTPS_PROXY`, `NO_PROXY`, …; see [`crate::egress`]).
    fn load_from<I, T>(
        cmd: clap::Command,
        args: I,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let parsed = cmd.try_get_matches_from(args).and_then(|m| Self::from_arg_matches(&m));
        let mut cfg = parsed.map_err(|e| match e.kind() {
            clap::error::ErrorKind::ValueValidation | clap::error::ErrorKind::MissingRequiredArgument => {
                ConfigError::Invalid(one_line(&e))
            }
            _ => ConfigError::Clap(e),
        })?;
        cfg.proxy = Proxy::select(cfg.proxy_setting.as_deref(), env).map_err(ConfigError::Invalid)?;
        cfg.validate().map_err(ConfigError::Invalid)
    }

    /// The HTTP proxy the agent reaches its relays through (`None`: directly). Pass it
    /// to [`crate::egress::connect_relay`], which also applies its `NO_PROXY` list.
    pub fn proxy(&self) -> std::option::Option<&Proxy> {
        self.proxy.as_ref()
    }

    /// The registration JWT (a secret: it is never in `Debug` output).
    pub fn registration_jwt(&self) -> &str {
        self.registration_jwt.expose()
    }

    /// Checks the rules that involve several settings (the JWT names the resource, or
    /// NAME must; an expired JWT is fine only for an agent already enrolled) and that
    /// STATE_DIR is writable, and fills in what follows from the JWT.
    pub fn validate(self) -> Result<AgentConfig, String> {
        let cfg = self.validate_settings()?;
        check_writable(&cfg.state_dir)?;
        cfg.check_jwt_expiry()?;
        Ok(cfg)
    }

    /// The part of [`validate`](Self::validate) about the settings alone, touching no
    /// file: the JWT's claims (decoded, expiry not judged), NAME or a resource JWT, the
    /// relay URL. `sluice-agent doctor` reports STATE_DIR and expiry as checks of their own.
    pub fn validate_settings(mut self) -> Result<AgentConfig, String> {
        // Expiry is checked by `check_jwt_expiry`, once we know whether STATE_DIR already
        // holds an identity: the JWT is for joining only, an enrolled agent restarts without it.
        self.claims = RegistrationClaims::decode_unverified(self.registration_jwt.expose(), 0)
            .map_err(|e| format!("REGISTRATION_JWT is not usable: {e}"))?;
        // A JWT issued for one resource names it; NAME may then be omitted.
        if self.name.is_empty() && self.claims.resource_id.is_none() {
            return Err(format!("NAME is not set (or blank): it must be {}", what("NAME")));
        }
        self.relay_url = match self.sluice_url.clone() {
            Some(url) => url,
            None => RelayUrl::parse(&self.claims.relay_url).map_err(|e| format!("SLUICE_URL: {e}"))?,
        };
        Ok(self)
    }

    /// An expired registration JWT is fine only for an agent already enrolled (a usable
    /// identity in STATE_DIR): the JWT is for joining, the certificate for everything after.
    pub fn check_jwt_expiry(&self) -> Result<(), String> {
        let now = unix_now();
        if let Some(exp) = self.claims.exp
            && exp <= now
            && crate::enroll::load(self).is_err()
        {
            return Err(format!(
                "REGISTRATION_JWT is not usable: {}; STATE_DIR {} holds no identity for it, so the agent must \
                 enroll and needs a valid JWT",
                sluice_proto::identity::ClaimsError::Expired { exp, now },
                self.state_dir.display()
            ));
        }
        Ok(())
    }
}

/// A clap error about one setting as the one line the agent prints: our value parsers'
/// messages already name the variable; a missing required setting is named here.
pub(crate) fn one_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    if let Some(why) = std::error::Error::source(e) {
        return why.to_string();
    }
    if let Some(ContextValue::Strings(missing)) = e.get(ContextKind::InvalidArg) {
        for var in ["APP_HOST", "APP_PORT", "REGISTRATION_JWT"] {
            if missing.iter().any(|m| m.contains(&format!("<{var}>"))) {
                return format!("{var} is not set: it must be {}", what(var));
            }
        }
    }
    e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_owned()
}

/// What a required setting must be, for the message saying it is missing.
fn what(var: &str) -> &'static str {
    match var {
        "APP_HOST" => "the host name or IP of the private service",
        "APP_PORT" => "the TCP port of the private service (1-65535)",
        "REGISTRATION_JWT" => "the registration JWT from the platform operator (sluice resources registration-jwt)",
        "NAME" => "the resource's display name, e.g. \"Acme PostgreSQL\"",
        _ => "set",
    }
}

fn required(var: &'static str) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |s: &str| match s.trim() {
        "" => Err(format!("{var} is empty: it must be {}", what(var))),
        s => Ok(s.to_owned()),
    }
}

fn required_secret(
    var: &'static str,
) -> impl Fn(&str) -> Result<Secret<String>, String> + Clone + Send + Sync + 'static {
    let required = required(var);
    move |s: &str| required(s).map(Secret::new)
}

fn parse_app_port(s: &str) -> Result<u16, String> {
    let port = required("APP_PORT")(s)?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("APP_PORT={port:?} is not a TCP port: it must be a number from 1 to 65535"))
}

/// Blank means "not given" (allowed when the JWT names the resource).
fn parse_name(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Ok(String::new());
    }
    sluice_proto::identity::validate_resource_name(s)
        .map(str::to_owned)
        .map_err(|e| format!("NAME={s:?} is not valid: {e}"))
}

fn parse_sluice_url(s: &str) -> Result<Option<RelayUrl>, String> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    RelayUrl::parse(s).map(Some).map_err(|e| format!("SLUICE_URL: {e}"))
}

fn parse_drain_timeout(s: &str) -> Result<Duration, String> {
    let secs: u64 = s
        .trim()
        .parse()
        .ok()
        .filter(|s| *s <= 3600)
        .ok_or_else(|| format!("SLUICE_DRAIN_TIMEOUT_SECS={s:?} is not a number of seconds from 0 to 3600"))?;
    Ok(Duration::from_secs(secs))
}

fn parse_reconnect_max(s: &str) -> Result<Duration, String> {
    let secs: u64 =
        s.trim().parse().map_err(|_| format!("SLUICE_RECONNECT_MAX_SECS={s:?} is not a number of seconds"))?;
    Ok(Duration::from_secs(secs.max(1)))
}

fn parse_service_check(s: &str) -> Result<Option<Duration>, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(secs) => Ok(Some(Duration::from_secs(secs))),
        Err(_) => Err(format!("SLUICE_SERVICE_CHECK_SECS={s:?} is not a number of seconds (0: check only at start)")),
    }
}

fn parse_metrics_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    match s.trim() {
        "" => Ok(None),
        a => a
            .parse()
            .map(Some)
            .map_err(|_| format!("SLUICE_METRICS_LISTEN={a:?} is not an address: use host:port, e.g. 127.0.0.1:9464")),
    }
}

fn parse_counter(s: &str) -> Result<CounterMode, String> {
    match s.trim() {
        "" | "auto" => Ok(CounterMode::Auto),
        "userspace" => Ok(CounterMode::Userspace),
        "sock_ops" | "sockops" => Ok(CounterMode::Ebpf(Counter::SockOps)),
        "cgroup_skb" | "skb" => Ok(CounterMode::Ebpf(Counter::Skb)),
        other => Err(format!("SLUICE_COUNTER={other:?} is not valid: use auto, sock_ops, cgroup_skb or userspace")),
    }
}

/// Creates the state directory (0700) if needed and proves it writable.
pub fn check_writable(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: std::io::Error| {
        format!(
            "STATE_DIR {} is not writable ({e}): point STATE_DIR at a directory this user can write, \
             e.g. a mounted volume",
            dir.display()
        )
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn jwt(extra: serde_json::Value) -> String {
        let mut c = serde_json::json!({
            "iss": "sluice-relay", "aud": "sluice-agent-registration", "jti": "j", "iat": 1,
            "customer_id": "cus_1", "relay_url": "https://relay.example:8443", "ca_pin": "ab"
        });
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.sig", b.encode(b"{}"), b.encode(c.to_string()))
    }

    /// The flags of a good configuration, as (flag, value); tests change one.
    fn flags(dir: &Path) -> Vec<(&'static str, String)> {
        vec![
            ("--app-host", "db".into()),
            ("--app-port", "5432".into()),
            ("--name", "orders-db".into()),
            ("--registration-jwt", jwt(serde_json::json!({}))),
            ("--state-dir", dir.display().to_string()),
        ]
    }

    fn set(f: &mut Vec<(&'static str, String)>, flag: &'static str, value: Option<&str>) {
        f.retain(|(k, _)| *k != flag);
        if let Some(v) = value {
            f.push((flag, v.into()));
        }
    }

    /// Parses and validates like `main`, from flags only (the test's environment is not read).
    fn load(f: &[(&'static str, String)]) -> Result<AgentConfig, String> {
        let args = std::iter::once("sluice-agent".to_owned()).chain(f.iter().map(|(k, v)| format!("{k}={v}")));
        match AgentConfig::load_from(sluice_runtime::ignoring_env(AgentConfig::command()), args, &|_| None) {
            Ok(c) => Ok(c),
            Err(ConfigError::Invalid(e)) => Err(e),
            Err(ConfigError::Clap(e)) => panic!("clap's own error: {e}"),
        }
    }

    #[test]
    fn good_config_takes_the_relay_from_the_jwt() {
        let d = tempfile::tempdir().unwrap();
        let c = load(&flags(d.path())).unwrap();
        assert_eq!(c.relay_url.to_string(), "https://relay.example:8443");
        assert_eq!(c.app_port, 5432);
        assert_eq!((c.data_path, c.ktls_engine), (DataPathMode::Auto, KtlsEngine::Splice));
        assert_eq!((c.reconnect_max, c.service_check), (Duration::from_secs(30), Some(Duration::from_secs(30))));
        assert_eq!((c.counter, c.metrics_listen), (CounterMode::Auto, None));
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        let mut f = flags(d.path());
        set(&mut f, "--data-path", Some("userspace"));
        set(&mut f, "--ktls-engine", Some("uring"));
        set(&mut f, "--service-check-secs", Some("0"));
        set(&mut f, "--sluice-url", Some("https://other:443"));
        set(&mut f, "--counter", Some("sock_ops"));
        let c = load(&f).unwrap();
        assert_eq!(c.counter, CounterMode::Ebpf(Counter::SockOps));
        assert_eq!((c.data_path, c.ktls_engine), (DataPathMode::Userspace, KtlsEngine::Uring));
        assert_eq!((c.service_check, c.relay_url.to_string()), (None, "https://other:443".into()));
    }

    #[test]
    fn blank_optional_settings_mean_their_defaults() {
        let d = tempfile::tempdir().unwrap();
        let mut f = flags(d.path());
        for flag in ["--sluice-url", "--metrics-listen", "--counter", "--data-path", "--ktls-engine"] {
            set(&mut f, flag, Some(" "));
        }
        let c = load(&f).unwrap();
        assert_eq!(c.relay_url.to_string(), "https://relay.example:8443");
        assert_eq!((c.metrics_listen, c.counter), (None, CounterMode::Auto));
        assert_eq!((c.data_path, c.ktls_engine), (DataPathMode::Auto, KtlsEngine::Splice));
    }

    #[test]
    fn each_bad_input_names_its_variable() {
        let d = tempfile::tempdir().unwrap();
        let jwt5 = jwt(serde_json::json!({"exp": 5}));
        let long = "x".repeat(101);
        let cases: Vec<(&'static str, Option<&str>, &str)> = vec![
            ("--app-host", None, "APP_HOST is not set"),
            ("--app-host", Some(" "), "APP_HOST is empty"),
            ("--app-port", None, "APP_PORT is not set"),
            ("--app-port", Some("70000"), "APP_PORT=\"70000\" is not a TCP port: it must be a number from 1 to 65535"),
            ("--app-port", Some("0"), "is not a TCP port"),
            ("--name", None, "NAME is not set"),
            ("--name", Some("a\nb"), "NAME=\"a\\nb\" is not valid"),
            ("--name", Some(&long), "at most 100"),
            ("--registration-jwt", None, "REGISTRATION_JWT is not set"),
            ("--registration-jwt", Some("nope"), "REGISTRATION_JWT is not usable: not a JWT"),
            ("--registration-jwt", Some(&jwt5), "expired"),
            ("--sluice-url", Some("http://x"), "SLUICE_URL"),
            ("--state-dir", Some("/proc/nope"), "STATE_DIR /proc/nope is not writable"),
            ("--metrics-listen", Some("nowhere"), "SLUICE_METRICS_LISTEN=\"nowhere\" is not an address"),
            ("--counter", Some("kernel"), "SLUICE_COUNTER=\"kernel\" is not valid"),
            ("--data-path", Some("kernel"), "SLUICE_DATA_PATH: unknown data path \"kernel\""),
            ("--ktls-engine", Some("fast"), "SLUICE_KTLS_ENGINE: unknown kernel TLS engine"),
            ("--reconnect-max-secs", Some("soon"), "SLUICE_RECONNECT_MAX_SECS=\"soon\""),
            ("--service-check-secs", Some("-1"), "SLUICE_SERVICE_CHECK_SECS=\"-1\""),
            ("--drain-timeout-secs", Some("7200"), "SLUICE_DRAIN_TIMEOUT_SECS=\"7200\" is not a number of seconds"),
            ("--proxy", Some("https://proxy:3128"), "SLUICE_PROXY=\"https://proxy:3128\" is not a usable proxy URL"),
            ("--proxy", Some("http://proxy:port"), "SLUICE_PROXY=\"http://proxy:port\" is not a usable proxy URL"),
        ];
        for (flag, value, want) in cases {
            let mut f = flags(d.path());
            set(&mut f, flag, value);
            let err = load(&f).unwrap_err();
            assert!(err.contains(want), "{flag}={value:?}: {err:?} should contain {want:?}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn the_proxy_comes_from_the_flag_else_the_standard_variables() {
        let d = tempfile::tempdir().unwrap();
        let args = |f: &[(&'static str, String)]| {
            std::iter::once("sluice-agent".to_owned())
                .chain(f.iter().map(|(k, v)| format!("{k}={v}")))
                .collect::<Vec<_>>()
        };
        let env = |var: &str| match var {
            "HTTPS_PROXY" => Some("http://alice:hunter2@proxy.corp:3128".to_owned()),
            "NO_PROXY" => Some(".internal".to_owned()),
            _ => None,
        };
        let cmd = || sluice_runtime::ignoring_env(AgentConfig::command());
        let load_env = |f: &[(&'static str, String)]| match AgentConfig::load_from(cmd(), args(f), &env) {
            Ok(c) => c,
            Err(_) => panic!("loads"),
        };
        let c = load_env(&flags(d.path()));
        let p = c.proxy().unwrap();
        assert_eq!((p.describe().as_str(), p.source()), ("http://alice:***@proxy.corp:3128", "HTTPS_PROXY"));
        assert!(p.bypasses("relay.internal", 443) && !format!("{c:?}").contains("hunter2"));
        let mut f = flags(d.path());
        set(&mut f, "--proxy", Some("none"));
        assert!(load_env(&f).proxy().is_none(), "SLUICE_PROXY=none wins over HTTPS_PROXY");
        set(&mut f, "--proxy", Some(""));
        assert!(load_env(&f).proxy().is_none(), "a blank SLUICE_PROXY too");
        set(&mut f, "--proxy", Some("http://other:8080"));
        assert_eq!(load_env(&f).proxy().unwrap().to_string(), "http://other:8080");
        assert!(load(&flags(d.path())).unwrap().proxy().is_none(), "no environment, no proxy");
    }

    #[test]
    fn names_are_display_names_as_customers_write_them() {
        let d = tempfile::tempdir().unwrap();
        for name in ["Acme MS SQL", "Acme PostgreSQL", "Lager Zürich"] {
            let mut f = flags(d.path());
            set(&mut f, "--name", Some(&format!(" {name} ")));
            assert_eq!(load(&f).unwrap().name, name);
        }
    }

    #[test]
    fn resource_jwt_makes_name_optional() {
        let d = tempfile::tempdir().unwrap();
        let mut f = flags(d.path());
        set(&mut f, "--name", None);
        set(&mut f, "--registration-jwt", Some(&jwt(serde_json::json!({"resource_id": "res_1", "generation": 1}))));
        assert_eq!(load(&f).unwrap().name, "");
    }

    #[test]
    fn debug_output_never_shows_the_registration_jwt() {
        let d = tempfile::tempdir().unwrap();
        let f = flags(d.path());
        let token = f.iter().find(|(k, _)| *k == "--registration-jwt").unwrap().1.clone();
        let c = load(&f).unwrap();
        assert_eq!(c.registration_jwt(), token);
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains(&token) && !shown.contains(token.split('.').nth(1).unwrap()), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn code_made_configs_use_the_flag_defaults() {
        let d = tempfile::tempdir().unwrap();
        let mut c = AgentConfig::new("db", 5432, " orders-db ", &jwt(serde_json::json!({}))).unwrap();
        c.state_dir = d.path().to_path_buf();
        let c = c.validate().unwrap();
        assert_eq!((c.name.as_str(), c.reconnect_max), ("orders-db", Duration::from_secs(30)));
        assert!(AgentConfig::new("db", 5432, "a\nb", "x.y.z").unwrap_err().contains("NAME=\"a\\nb\" is not valid"));
        assert_eq!(c.relay_url.to_string(), "https://relay.example:8443");
    }
}
