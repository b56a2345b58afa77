//! The deployment files in `deploy/`, checked without a Docker engine or a running
//! systemd:
//!
//! - both compose files validate against the vendored Compose Specification schema
//!   (`deploy/schema/compose-spec.json`, with Debian's python3 `jsonschema` and `yaml`
//!   from `scripts/install-test-deps.sh`), and keep what operators rely on (the agent's
//!   host-gateway mapping, health check, stop grace period, restart policy);
//! - both systemd units pass `systemd-analyze verify` (on a copy whose ExecStart names a
//!   binary that exists here) and the agent's `systemd-analyze security` exposure is at
//!   most 4.0.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy")
}

/// Validates YAML files against the vendored compose schema; the errors, one line each.
const VALIDATE: &str = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
bad = 0
for path in sys.argv[2:]:
    doc = yaml.safe_load(open(path))
    for e in jsonschema.Draft7Validator(schema).iter_errors(doc):
        bad += 1
        print(f"{path}: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}")
sys.exit(1 if bad else 0)
"#;

/// Debian's python3 (where python3-jsonschema goes), else the one on PATH.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" }
}

fn validate(files: &[PathBuf]) -> std::process::Output {
    let out = Command::new(python())
        .arg("-c")
        .arg(VALIDATE)
        .arg(deploy().join("schema/compose-spec.json"))
        .args(files)
        .output()
        .expect("python3 runs (scripts/install-test-deps.sh installs python3-yaml and python3-jsonschema)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "{stderr}\ninstall the validator: bash scripts/install-test-deps.sh (python3-yaml, python3-jsonschema)"
    );
    out
}

#[test]
fn compose_files_follow_the_compose_spec() {
    let files = [deploy().join("docker-compose.yml"), deploy().join("relay-compose.yml")];
    let out = validate(&files);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_validator_rejects_a_misspelt_compose_file() {
    let dir = sluice_e2e::test_dir("compose-bad");
    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        "services:\n  a:\n    image: x\n    healthcheck:\n      test: [\"CMD\", \"x\"]\n      intervall: 30s\n",
    )
    .unwrap();
    let out = validate(std::slice::from_ref(&bad));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("intervall"), "{out:?}");
}

#[test]
fn agent_compose_file_keeps_what_operators_rely_on() {
    let text = std::fs::read_to_string(deploy().join("docker-compose.yml")).unwrap();
    for needed in [
        "host.docker.internal:host-gateway",
        "stop_grace_period: 40s",
        "restart: unless-stopped",
        "SLUICE_EXIT_DELAY_SECS",
        "\"/usr/local/bin/sluice-agent\", \"health\"",
        "context: ../target/dist/image-agent",
        "sluice-agent-state:/var/lib/sluice-agent",
    ] {
        assert!(text.contains(needed), "deploy/docker-compose.yml lost {needed:?}");
    }
}

fn systemd_analyze() -> bool {
    let present = Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success());
    if !present {
        eprintln!("SKIPPED: systemd-analyze is not installed (scripts/install-test-deps.sh installs systemd)");
    }
    present
}

/// `systemd-analyze verify` on a copy of `unit` whose ExecStart runs /bin/true (verify
/// wants the binary to exist); warnings count as failures.
fn verify(unit: &str, binary: &str) {
    let dir = sluice_e2e::test_dir("units");
    let text = std::fs::read_to_string(deploy().join(unit)).unwrap();
    assert!(text.contains(&format!("ExecStart={binary}")), "{unit} runs {binary}");
    let copy = dir.path().join(unit);
    std::fs::write(&copy, text.replace(&format!("ExecStart={binary}"), "ExecStart=/bin/true")).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {unit}:\n{said}");
}

/// The overall exposure `systemd-analyze security --offline=true` gives `unit`.
fn exposure(unit: &str) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(deploy().join(unit))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}{}", String::from_utf8_lossy(&out.stderr)));
    eprintln!("{unit}: {}", line.trim_start_matches(|c: char| !c.is_ascii_alphanumeric()));
    let score = line.split(':').nth(1).and_then(|s| s.split_whitespace().next()).unwrap();
    score.parse().unwrap_or_else(|_| panic!("exposure {score:?} in {line:?}"))
}

#[test]
fn units_verify_and_the_agent_unit_is_exposed_at_most_4() {
    if !systemd_analyze() {
        return;
    }
    verify("sluice-agent.service", "/usr/local/bin/sluice-agent");
    verify("sluice.service", "/usr/local/bin/sluice serve");
    let agent = exposure("sluice-agent.service");
    assert!(agent <= 4.0, "sluice-agent.service exposure {agent} > 4.0: tighten its sandboxing");
    let relay = exposure("sluice.service");
    assert!(relay <= 4.0, "sluice.service exposure {relay} > 4.0");
}

#[test]
fn units_restart_except_on_final_exits_and_notify_readiness() {
    let agent = std::fs::read_to_string(deploy().join("sluice-agent.service")).unwrap();
    for needed in ["Type=notify", "Restart=always", "RestartPreventExitStatus=1 2", "CAP_BPF CAP_NET_ADMIN", "bpf"] {
        assert!(agent.contains(needed), "sluice-agent.service lost {needed:?}");
    }
    let relay = std::fs::read_to_string(deploy().join("sluice.service")).unwrap();
    for needed in ["Type=notify", "Restart=always", "RestartPreventExitStatus=2"] {
        assert!(relay.contains(needed), "sluice.service lost {needed:?}");
    }
    let sysusers = std::fs::read_to_string(deploy().join("sluice-agent.sysusers")).unwrap();
    assert!(sysusers.contains("u sluice-agent"), "the unit's User= is created by sysusers.d");
}
