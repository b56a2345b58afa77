//! The agent's configuration, checked up front: every problem is reported as one clear
//! line before the agent touches the network.

use sluice_datapath::{DataPathMode, KtlsEngine};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_proto::identity::{RegistrationClaims, unix_now};
use sluice_proto::relay_url::RelayUrl;

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The private service's host.
    pub app_host: String,
    pub app_port: u16,
    /// The resource name the agent registers.
    pub name: String,
    pub registration_jwt: String,
    pub claims: RegistrationClaims,
    pub state_dir: PathBuf,
    /// The relay to dial (from `SLUICE_URL`, else from the JWT).
    pub relay_url: RelayUrl,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
    /// eBPF or user-space byte counting.
    pub counter: crate::meter::CounterMode,
    /// Where to serve Prometheus metrics; off when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Kernel TLS when available, or always user-space rustls.
    pub data_path: DataPathMode,
    /// How kernel-TLS streams move bytes.
    pub ktls_engine: KtlsEngine,
    /// How often to check that the private service accepts connections (`None`: only at
    /// start and through real streams).
    pub service_check: Option<Duration>,
}

/// The raw inputs (environment variables or flags), before validation.
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    pub app_host: Option<String>,
    pub app_port: Option<String>,
    pub name: Option<String>,
    pub registration_jwt: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub relay_url: Option<String>,
    pub reconnect_max_secs: Option<u64>,
    pub metrics_listen: Option<String>,
    /// `auto` (eBPF if it loads) or `userspace`.
    pub counter: Option<String>,
    /// `auto` (kernel TLS when available) or `userspace`.
    pub data_path: Option<String>,
    /// `splice`, `uring`, `threads` or `copy`.
    pub ktls_engine: Option<String>,
    /// Seconds between checks of the private service; 0 turns the periodic check off.
    pub service_check_secs: Option<u64>,
}

/// The state directory when none is given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sluice-agent";

fn required(v: &Option<String>, var: &str, what: &str) -> Result<String, String> {
    match v.as_deref().map(str::trim) {
        None => Err(format!("{var} is not set: it must be {what}")),
        Some("") => Err(format!("{var} is empty: it must be {what}")),
        Some(s) => Ok(s.to_owned()),
    }
}

impl RawConfig {
    /// Checks every input; the error is one line naming the variable and the fix.
    pub fn validate(self) -> Result<AgentConfig, String> {
        let app_host = required(&self.app_host, "APP_HOST", "the host name or IP of the private service")?;
        let port = required(&self.app_port, "APP_PORT", "the TCP port of the private service (1-65535)")?;
        let app_port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("APP_PORT={port:?} is not a TCP port: it must be a number from 1 to 65535"))?;
        let jwt = required(
            &self.registration_jwt,
            "REGISTRATION_JWT",
            "the registration JWT from the platform operator (sluice resources registration-jwt)",
        )?;
        // Expiry is checked below, once we know whether STATE_DIR already holds an
        // identity: the JWT is for joining only, an enrolled agent restarts without it.
        let claims = RegistrationClaims::decode_unverified(&jwt, 0)
            .map_err(|e| format!("REGISTRATION_JWT is not usable: {e}"))?;
        // A JWT issued for one resource names it; NAME may then be omitted.
        let name = match (&self.name, &claims.resource_id) {
            (Some(n), _) if !n.trim().is_empty() => sluice_proto::identity::validate_resource_name(n)
                .map_err(|e| format!("NAME={n:?} is not valid: {e}"))?
                .to_owned(),
            (_, Some(_)) => String::new(),
            _ => required(&self.name, "NAME", "the resource's display name, e.g. \"Acme PostgreSQL\"")?,
        };
        let url = self.relay_url.filter(|u| !u.trim().is_empty()).unwrap_or_else(|| claims.relay_url.clone());
        let relay_url = RelayUrl::parse(&url).map_err(|e| format!("SLUICE_URL: {e}"))?;
        let state_dir = self.state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        check_writable(&state_dir)?;
        let metrics_listen = match self.metrics_listen.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| {
                format!("SLUICE_METRICS_LISTEN={a:?} is not an address: use host:port, e.g. 127.0.0.1:9464")
            })?),
        };
        let counter = match self.counter.as_deref().map(str::trim) {
            None | Some("") | Some("auto") => crate::meter::CounterMode::Auto,
            Some("userspace") => crate::meter::CounterMode::Userspace,
            Some(other) => return Err(format!("SLUICE_COUNTER={other:?} is not valid: use auto or userspace")),
        };
        let data_path = match self.data_path.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => DataPathMode::Auto,
            Some(s) => s.parse().map_err(|e| format!("SLUICE_DATA_PATH: {e}"))?,
        };
        let ktls_engine = match self.ktls_engine.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => KtlsEngine::default(),
            Some(s) => s.parse().map_err(|e| format!("SLUICE_KTLS_ENGINE: {e}"))?,
        };
        let cfg = AgentConfig {
            service_check: match self.service_check_secs {
                Some(0) => None,
                Some(s) => Some(Duration::from_secs(s)),
                None => Some(Duration::from_secs(30)),
            },
            data_path,
            ktls_engine,
            counter,
            app_host,
            app_port,
            name,
            registration_jwt: jwt,
            claims,
            state_dir,
            relay_url,
            reconnect_max: Duration::from_secs(self.reconnect_max_secs.unwrap_or(30).max(1)),
            metrics_listen,
        };
        let now = unix_now();
        if let Some(exp) = cfg.claims.exp
            && exp <= now
            && crate::enroll::load(&cfg).is_err()
        {
            return Err(format!(
                "REGISTRATION_JWT is not usable: {}; STATE_DIR {} holds no identity for it, so the agent must \
                 enroll and needs a valid JWT",
                sluice_proto::identity::ClaimsError::Expired { exp, now },
                cfg.state_dir.display()
            ));
        }
        Ok(cfg)
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

    fn raw(dir: &Path) -> RawConfig {
        RawConfig {
            app_host: Some("db".into()),
            app_port: Some("5432".into()),
            name: Some("orders-db".into()),
            registration_jwt: Some(jwt(serde_json::json!({}))),
            state_dir: Some(dir.to_path_buf()),
            ..Default::default()
        }
    }

    #[test]
    fn good_config_takes_the_relay_from_the_jwt() {
        let d = tempfile::tempdir().unwrap();
        let c = raw(d.path()).validate().unwrap();
        assert_eq!(c.relay_url.to_string(), "https://relay.example:8443");
        assert_eq!(c.app_port, 5432);
        assert_eq!((c.data_path, c.ktls_engine), (DataPathMode::Auto, KtlsEngine::Splice));
        let mut r = raw(d.path());
        (r.data_path, r.ktls_engine) = (Some("userspace".into()), Some("uring".into()));
        let c = r.validate().unwrap();
        assert_eq!((c.data_path, c.ktls_engine), (DataPathMode::Userspace, KtlsEngine::Uring));
    }

    #[test]
    fn each_bad_input_names_its_variable() {
        let d = tempfile::tempdir().unwrap();
        type Mutate = Box<dyn Fn(&mut RawConfig)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (Box::new(|r| r.app_host = None), "APP_HOST is not set"),
            (Box::new(|r| r.app_host = Some(" ".into())), "APP_HOST is empty"),
            (Box::new(|r| r.app_port = Some("70000".into())), "APP_PORT=\"70000\" is not a TCP port"),
            (Box::new(|r| r.app_port = Some("0".into())), "is not a TCP port"),
            (Box::new(|r| r.name = None), "NAME is not set"),
            (Box::new(|r| r.name = Some("a\nb".into())), "NAME=\"a\\nb\" is not valid"),
            (Box::new(|r| r.name = Some("x".repeat(101))), "at most 100"),
            (Box::new(|r| r.registration_jwt = Some("nope".into())), "REGISTRATION_JWT is not usable: not a JWT"),
            (Box::new(|r| r.registration_jwt = Some(jwt(serde_json::json!({"exp": 5})))), "expired"),
            (Box::new(|r| r.relay_url = Some("http://x".into())), "SLUICE_URL"),
            (Box::new(|r| r.state_dir = Some("/proc/nope".into())), "STATE_DIR /proc/nope is not writable"),
            (Box::new(|r| r.data_path = Some("kernel".into())), "SLUICE_DATA_PATH: unknown data path \"kernel\""),
            (Box::new(|r| r.ktls_engine = Some("fast".into())), "SLUICE_KTLS_ENGINE: unknown kernel TLS engine"),
        ];
        for (mutate, want) in cases {
            let mut r = raw(d.path());
            mutate(&mut r);
            let err = r.validate().unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn names_are_display_names_as_customers_write_them() {
        let d = tempfile::tempdir().unwrap();
        for name in ["Acme MS SQL", "Acme PostgreSQL", "Lager Zürich"] {
            let mut r = raw(d.path());
            r.name = Some(format!(" {name} "));
            assert_eq!(r.validate().unwrap().name, name);
        }
    }

    #[test]
    fn resource_jwt_makes_name_optional() {
        let d = tempfile::tempdir().unwrap();
        let mut r = raw(d.path());
        r.name = None;
        r.registration_jwt = Some(jwt(serde_json::json!({"resource_id": "res_1", "generation": 1})));
        assert_eq!(r.validate().unwrap().name, "");
    }
}
