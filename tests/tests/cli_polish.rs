//! The admin CLI as scripts and shells use it: `sluice streams --watch` piped into a
//! program (JSON lines, never screen-control codes), shell completions for both
//! binaries, resources named instead of by id, `--ignore-not-found` on the delete and
//! revoke commands, and JSON logs whose fields are values (`"customer":"cus_…"`).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, bin, test_dir, wait_for};

/// Runs `sluice ARGS` against `relay` with stdout piped (not a terminal) for about
/// `secs` seconds, then stops it; returns what it printed.
fn piped_for(relay: &Relay, args: &[&str], secs: u64) -> Vec<u8> {
    let mut child = Command::new(bin("sluice"))
        .args(args)
        .arg("--data-dir")
        .arg(relay.data_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    std::thread::sleep(Duration::from_secs(secs));
    assert!(child.try_wait().unwrap().is_none(), "`sluice {args:?}` stopped watching");
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_watch_piped_prints_json_lines_and_no_screen_control_codes() {
    let dir = test_dir("cli-watch");
    let relay = Relay::start(dir.path());
    let echo = echo_server().await;
    let cid = relay.create_customer("Zürich Straßenbahn AG");
    let agent = Agent::for_service(dir.path(), "orders-db", echo.port(), &relay.customer_jwt(&cid));
    relay.wait_status("orders-db", "AVAILABLE", Some(&agent));
    // One stream open while watching.
    let ep = relay.endpoint("orders-db");
    let _open = tokio::net::TcpStream::connect(&ep).await.unwrap();
    wait_for(Duration::from_secs(20), "the stream to be listed", || {
        relay.cli_ok(&["streams"]).contains("orders-db").then_some(())
    })
    .unwrap();

    // Half-speed machines still refresh at least twice in 4 s (one refresh a second).
    let json = piped_for(&relay, &["streams", "--watch", "--output", "json"], 4);
    assert!(!json.contains(&0x1b), "no escape sequence when piped: {:?}", String::from_utf8_lossy(&json));
    let text = String::from_utf8(json).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 2, "one JSON line per refresh: {text}");
    for line in &lines {
        let snapshot: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(snapshot["at_ms"].as_u64().is_some(), "{line}");
        let streams = snapshot["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 1, "{line}");
        assert_eq!(streams[0]["resource_name"], "orders-db", "{line}");
    }

    let tables = piped_for(&relay, &["streams", "--watch"], 4);
    assert!(!tables.contains(&0x1b), "no clear-screen when piped: {:?}", String::from_utf8_lossy(&tables));
    let text = String::from_utf8(tables).unwrap();
    let headers = text.lines().filter(|l| l.starts_with("Resource")).count();
    assert!(headers >= 2, "successive tables: {text}");
    assert!(text.contains("\n\nsluice streams — 1 open"), "tables separated by a blank line: {text}");
    assert!(!text.contains("Ctrl-C"), "no terminal hint in a pipe: {text}");
}

#[test]
fn shell_completions_for_both_binaries() {
    for (binary, subcommands) in [
        ("sluice", &["serve", "resources", "streams", "leases", "completion"][..]),
        ("sluice-agent", &["completion"][..]),
    ] {
        for shell in ["bash", "zsh", "fish"] {
            let out = Command::new(bin(binary)).args(["completion", shell]).output().unwrap();
            assert!(out.status.success(), "{binary} completion {shell}: {}", String::from_utf8_lossy(&out.stderr));
            let script = String::from_utf8(out.stdout).unwrap();
            assert!(script.len() > 200, "{binary} completion {shell}: {script}");
            for sub in subcommands {
                assert!(script.contains(sub), "{binary} completion {shell} lacks {sub}:\n{script}");
            }
            if shell == "bash" {
                let path = std::env::temp_dir().join(format!("{binary}-{}.bash", std::process::id()));
                std::fs::write(&path, &script).unwrap();
                let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
                let _ = std::fs::remove_file(&path);
                assert!(check.status.success(), "bash -n: {}", String::from_utf8_lossy(&check.stderr));
            }
        }
        let bad = Command::new(bin(binary)).args(["completion", "tcsh"]).output().unwrap();
        assert!(!bad.status.success(), "{binary}: an unknown shell is refused");
        assert!(String::from_utf8_lossy(&bad.stderr).contains("bash"), "the error lists the shells");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_by_name_and_ignore_not_found() {
    let dir = test_dir("cli-names");
    let relay = Relay::start(dir.path());
    let echo = echo_server().await;
    let acme = relay.create_customer("acme");
    let globex = relay.create_customer("globex");
    let a1 = Agent::for_service(dir.path(), "orders-db", echo.port(), &relay.customer_jwt(&acme));
    relay.wait_status("orders-db", "AVAILABLE", Some(&a1));
    let acme_orders = relay.resource("orders-db").unwrap()["id"].as_str().unwrap().to_owned();

    // --resource-id takes a name.
    let jwt = relay.cli_ok(&["resources", "registration-jwt", "--resource-id", "orders-db", "--output", "json"]);
    let issued: serde_json::Value = serde_json::from_str(&jwt).unwrap();
    assert_eq!(issued["resource_id"], acme_orders.as_str(), "{jwt}");

    // A second customer's resource of the same name: the name alone is ambiguous (409,
    // naming both customers); --customer-id says which.
    let globex_jwt = relay.customer_jwt(&globex);
    let a2 = Agent::start(
        dir.path(),
        "globex-orders",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &echo.port().to_string()),
            ("NAME", "orders-db"),
            ("REGISTRATION_JWT", &globex_jwt),
        ],
    );
    wait_for(Duration::from_secs(20), "two resources named orders-db", || {
        let list: serde_json::Value =
            serde_json::from_str(&relay.cli_ok(&["resources", "list", "--output", "json"])).unwrap();
        (list.as_array().unwrap().len() == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a2.proc.log_text()));
    let ambiguous = relay.cli(&["resources", "delete", "orders-db"]);
    let err = String::from_utf8_lossy(&ambiguous.stderr);
    assert!(!ambiguous.status.success(), "{err}");
    assert!(err.contains("409") && err.contains(&acme) && err.contains(&globex), "{err}");
    let ambiguous = relay.cli(&["resources", "delete", "orders-db", "--ignore-not-found"]);
    assert!(!ambiguous.status.success(), "--ignore-not-found does not hide an ambiguous name");
    let rotated =
        relay.cli(&["resources", "registration-jwt", "--resource-id", "orders-db", "--customer-id", &acme, "--rotate"]);
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    assert!(String::from_utf8_lossy(&rotated.stderr).contains(&acme_orders), "rotated acme's resource");

    // Delete by name (within a customer); a second delete is an error, or a note with
    // --ignore-not-found.
    let out = relay.cli(&["resources", "delete", "orders-db", "--customer-id", &globex]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let left: serde_json::Value =
        serde_json::from_str(&relay.cli_ok(&["resources", "list", "--output", "json"])).unwrap();
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["id"], acme_orders.as_str(), "globex's resource went, acme's stayed: {left}");
    let again = relay.cli(&["resources", "delete", "orders-db", "--customer-id", &globex]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("404"), "{}", String::from_utf8_lossy(&again.stderr));
    for args in [
        &["resources", "delete", "no-such-db", "--ignore-not-found"][..],
        &["resources", "delete", "res_missing", "--ignore-not-found"][..],
        &["leases", "delete", "lse_missing", "--ignore-not-found"][..],
        &["tokens", "revoke", "jwt_missing", "--ignore-not-found"][..],
        &["api-tokens", "revoke", "tok_missing", "--ignore-not-found"][..],
    ] {
        let out = relay.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "sluice {args:?}: {err}");
        assert!(err.contains("does not exist (--ignore-not-found)"), "sluice {args:?}: {err}");
        assert!(out.stdout.is_empty(), "sluice {args:?} printed {:?}", String::from_utf8_lossy(&out.stdout));
        let without: Vec<&str> = args.iter().copied().filter(|a| *a != "--ignore-not-found").collect();
        assert!(!relay.cli(&without).status.success(), "sluice {without:?} fails without the flag");
    }
    drop(a2);
}

#[test]
fn json_logs_carry_ids_as_values_not_debug_text() {
    let dir = test_dir("cli-json-logs");
    let relay = Relay::start_with(dir.path(), &["--log-json"]);
    let cid = relay.create_customer("acme");
    relay.customer_jwt(&cid);
    let line = wait_for(Duration::from_secs(10), "the JWT issue to be logged", || {
        relay.log().lines().find(|l| l.contains("registration JWT issued")).map(str::to_owned)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["fields"]["customer"], cid.as_str(), "{line}");
    assert!(v["fields"].get("resource").is_none(), "an absent resource is no field, not None: {line}");
}
