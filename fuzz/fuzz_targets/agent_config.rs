//! The agent's configuration (`AgentConfig::load_from_flags`: the same clap parsers and
//! checks as the environment variables `APP_HOST`, `APP_PORT`, `NAME`,
//! `REGISTRATION_JWT`, `SLUICE_URL`, …), from any values, valid UTF-8 or not.
//!
//! `STATE_DIR` is always a temporary directory (the check creates it). Besides a raw
//! `REGISTRATION_JWT`, the input can give the JWT's claims as plain JSON, which the
//! target wraps into a token, so that it reaches the checks after the JWT is read
//! (the input format is at [`flags`]).
//!
//! Checks: no panic; a refusal is one line that names the setting to fix; an accepted
//! configuration has a service port, a trimmed service host, a valid NAME (or a JWT that
//! names the resource) and a relay URL that prints and parses back to itself.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::sync::LazyLock;

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use sluice_agent::config::{AgentConfig, ConfigError};
use sluice_proto::identity::validate_resource_name;
use sluice_proto::relay_url::RelayUrl;

static STATE_DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().expect("temporary directory"));

/// The settings the fuzzer may give (every one but `--state-dir`), with the variable
/// that a refusal about it must name.
const SETTINGS: [(&str, &str); 12] = [
    ("--app-host", "APP_HOST"),
    ("--app-port", "APP_PORT"),
    ("--name", "NAME"),
    ("--registration-jwt", "REGISTRATION_JWT"),
    ("--sluice-url", "SLUICE_URL"),
    ("--reconnect-max-secs", "SLUICE_RECONNECT_MAX_SECS"),
    ("--metrics-listen", "SLUICE_METRICS_LISTEN"),
    ("--counter", "SLUICE_COUNTER"),
    ("--data-path", "SLUICE_DATA_PATH"),
    ("--ktls-engine", "SLUICE_KTLS_ENGINE"),
    ("--service-check-secs", "SLUICE_SERVICE_CHECK_SECS"),
    ("--log", "SLUICE_LOG"),
];

/// The input: settings separated by NUL bytes (which no environment value can hold),
/// each `VARIABLE=value` with any bytes as the value, e.g.
/// `APP_HOST=db\0APP_PORT=5432\0NAME=orders-db\0REGISTRATION_JWT_CLAIMS={…}`.
/// `REGISTRATION_JWT_CLAIMS` gives the JWT's claims as JSON. A setting given twice, or
/// a variable not in [`SETTINGS`], is skipped.
fn flags(data: &[u8]) -> Vec<OsString> {
    let mut args = vec![OsString::from("sluice-agent")];
    let mut given = [false; SETTINGS.len()];
    for setting in data.split(|&b| b == 0) {
        let Some(eq) = setting.iter().position(|&b| b == b'=') else { continue };
        let (var, value) = (&setting[..eq], &setting[eq + 1..]);
        let (var, value) = if var == b"REGISTRATION_JWT_CLAIMS" {
            let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            (&b"REGISTRATION_JWT"[..], format!("{}.{}.sig", b.encode(b"{}"), b.encode(value)).into_bytes())
        } else {
            (var, value.to_vec())
        };
        let Some(i) = SETTINGS.iter().position(|(_, v)| v.as_bytes() == var) else { continue };
        if std::mem::replace(&mut given[i], true) {
            continue;
        }
        let mut arg = format!("{}=", SETTINGS[i].0).into_bytes();
        arg.extend_from_slice(&value);
        args.push(OsString::from_vec(arg));
    }
    args
}

fuzz_target!(|data: &[u8]| {
    let mut args = flags(data);
    args.push(OsString::from(format!("--state-dir={}", STATE_DIR.path().display())));

    match AgentConfig::load_from_flags(args.clone()) {
        Ok(cfg) => {
            assert_ne!(cfg.app_port, 0);
            assert!(!cfg.app_host.is_empty() && cfg.app_host == cfg.app_host.trim(), "{:?}", cfg.app_host);
            if cfg.name.is_empty() {
                assert!(cfg.claims.resource_id.is_some(), "no NAME and a JWT that names no resource");
            } else {
                assert_eq!(validate_resource_name(&cfg.name), Ok(cfg.name.as_str()));
            }
            let url = cfg.relay_url.to_string();
            assert_eq!(RelayUrl::parse(&url).as_ref(), Ok(&cfg.relay_url), "{url}");
        }
        Err(ConfigError::Invalid(why)) => {
            assert!(!why.contains('\n') && !why.contains('\r'), "not one line: {why:?}");
            assert!(
                SETTINGS.iter().any(|(_, var)| why.contains(var)) || why.contains("STATE_DIR"),
                "names no setting: {why:?} (from {args:?})"
            );
        }
        Err(ConfigError::Clap(e)) => {
            use clap::error::ErrorKind::*;
            assert!(matches!(e.kind(), InvalidUtf8), "clap's own {:?} error for {args:?}: {e}", e.kind());
        }
    }
});
