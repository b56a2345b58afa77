//! The admin token under a service manager and its rotation: the relay never prints it
//! when stdout is not a terminal (it says where the file is), and `sluice admin-token
//! rotate` replaces it while the relay runs — the old token is refused, the new one
//! works, the rotation is audited, and the relay is never restarted.

use std::os::unix::fs::PermissionsExt;

use serde_json::Value;
use sluice_e2e::{Relay, test_dir};

#[test]
fn the_admin_token_is_not_printed_under_a_pipe_and_rotates_without_a_restart() {
    let dir = test_dir("admin-token-rotate");
    let mut relay = Relay::start(dir.path());
    let file = relay.data_dir().join("admin-token");
    let old = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);

    // First start, stdout a log file (as under systemd): where, never what.
    let log = relay.log();
    assert!(!log.contains(&old), "the admin token is in the relay's stdout/log:\n{log}");
    assert!(
        log.contains(&format!("Admin token created and stored in {}", file.display()))
            && log.contains("not printed because stdout is not a terminal"),
        "{log}"
    );

    let pid = relay.proc.as_ref().unwrap().child.id();
    relay.cli_ok(&["customers", "create", "before", "--admin-token", &old]);

    // Rotate with the current token (read from the data directory by the CLI).
    let out = relay.cli(&["admin-token", "rotate"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}\n{}", relay.log());
    let new = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(new.starts_with("sluice_admin_") && new != old, "{new}");
    assert!(stderr.contains("Admin token rotated") && stderr.contains(&file.display().to_string()), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), new, "the relay wrote the new token to its file");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);

    // The old token: 401 with what to do. The new one: works (and so does the file).
    let refused = relay.cli(&["customers", "list", "--admin-token", &old]);
    let msg = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "the old token still works");
    assert!(msg.contains("401") && msg.contains("replaced by `sluice admin-token rotate`"), "{msg}");
    relay.cli_ok(&["customers", "create", "after", "--admin-token", &new]);
    relay.cli_ok(&["customers", "list"]);

    // Never restarted: the same process, its log has no second start.
    assert!(relay.proc.as_mut().unwrap().is_running());
    assert_eq!(relay.proc.as_ref().unwrap().child.id(), pid);
    assert_eq!(relay.log().matches("relay ready").count(), 1, "{}", relay.log());

    // Audited, with the new token's id as the target and no secret in the record.
    let audit: Vec<Value> = serde_json::from_str(&relay.cli_ok(&["audit", "--output", "json"])).unwrap();
    let rotation = audit
        .iter()
        .find(|r| r["action"] == "rotate_admin_token")
        .unwrap_or_else(|| panic!("no rotation in the audit trail: {audit:?}"));
    assert_eq!(rotation["status"], 200, "{rotation}");
    assert!(rotation["target"].as_str().unwrap().starts_with("adm_"), "{rotation}");
    let text = serde_json::to_string(&audit).unwrap();
    assert!(!text.contains(&new) && !text.contains(&old));
    // The refused try with the old token is in the trail too.
    assert!(audit.iter().any(|r| r["status"] == 401), "{audit:?}");

    // A second rotation refuses the first rotation's token as well, and survives a restart.
    let newer = relay.cli_ok(&["admin-token", "rotate"]);
    assert!(!relay.cli(&["customers", "list", "--admin-token", &new]).status.success());
    relay.restart();
    relay.cli_ok(&["customers", "list", "--admin-token", &newer]);
    assert!(!relay.cli(&["customers", "list", "--admin-token", &old]).status.success());
    assert!(!relay.log().contains(&newer), "a restart prints no token");
}
