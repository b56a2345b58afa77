//! Resource names as customers write them: display names with spaces and Unicode, looked
//! up by name (quoted) everywhere, and a name two customers share asks for `--customer-id`.

use std::time::Duration;

use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, bin, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn echo_through(endpoint: &str) -> String {
    let mut s = TcpStream::connect(endpoint).await.unwrap();
    s.write_all(b"ping through a named resource").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = String::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut back)).await.unwrap().unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn display_names_with_spaces_work_and_shared_names_ask_for_the_customer() {
    let dir = test_dir("names");
    let relay = Relay::start(dir.path());
    let echo = echo_server().await;
    let acme = relay.create_customer("Acme Corp");
    let globex = relay.create_customer("Globex");
    let (acme_jwt, globex_jwt) = (relay.customer_jwt(&acme), relay.customer_jwt(&globex));

    // The names the on-prem agent docs use, as `docker run -e NAME=…` passes them.
    let mssql = Agent::for_service(dir.path(), "Acme MS SQL", echo.port(), &acme_jwt);
    relay.wait_status("Acme MS SQL", "AVAILABLE", Some(&mssql));
    let ep = relay.cli_ok(&["resources", "endpoint", "Acme MS SQL"]);
    assert_eq!(echo_through(&ep).await, "ping through a named resource");
    let table = relay.cli_ok(&["resources", "list"]);
    assert!(table.contains("Acme MS SQL") && table.contains("Acme Corp"), "{table}");
    let id = relay.resource("Acme MS SQL").unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(relay.cli_ok(&["resources", "endpoint", &id]), ep, "by id and by name agree");
    let unicode = Agent::for_service(dir.path(), "Lager Zürich", echo.port(), &acme_jwt);
    relay.wait_status("Lager Zürich", "AVAILABLE", Some(&unicode));
    let ep2 = relay.cli_ok(&["resources", "endpoint", "Lager Zürich"]);
    assert_eq!(echo_through(&ep2).await, "ping through a named resource");

    // Two customers name a resource the same: each lookup says which customer it means.
    let pg_a = Agent::start(
        dir.path(),
        "pg-acme",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &echo.port().to_string()),
            ("NAME", "Acme PostgreSQL"),
            ("REGISTRATION_JWT", &acme_jwt),
        ],
    );
    let pg_g = Agent::start(
        dir.path(),
        "pg-globex",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &echo.port().to_string()),
            ("NAME", "Acme PostgreSQL"),
            ("REGISTRATION_JWT", &globex_jwt),
        ],
    );
    wait_for(Duration::from_secs(60), "both customers' \"Acme PostgreSQL\" to be AVAILABLE", || {
        let list: serde_json::Value =
            serde_json::from_str(&relay.cli_ok(&["resources", "list", "-o", "json"])).unwrap();
        let up = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["name"] == "Acme PostgreSQL" && r["status"] == "AVAILABLE")
            .count();
        (up == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}\n{}", relay.log(), pg_a.proc.log_text(), pg_g.proc.log_text()));
    let out = relay.cli(&["resources", "endpoint", "Acme PostgreSQL"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an ambiguous name is not silently resolved");
    assert!(err.contains("--customer-id") && err.contains(&acme) && err.contains(&globex), "{err}");
    let ep_a = relay.cli_ok(&["resources", "endpoint", "Acme PostgreSQL", "--customer-id", &acme]);
    let ep_g = relay.cli_ok(&["resources", "endpoint", "Acme PostgreSQL", "--customer-id", &globex]);
    assert_ne!(ep_a, ep_g, "each customer's resource has its own port");
    assert_eq!(echo_through(&ep_g).await, "ping through a named resource");
    let out = relay.cli(&["resources", "endpoint", "Acme MS SQL", "--customer-id", &globex]);
    assert!(!out.status.success(), "another customer's name is not found under --customer-id");
}

#[test]
fn names_with_control_characters_are_refused_with_one_line() {
    let dir = test_dir("names-bad");
    for (name, why) in
        [("db\nINFO forged", "U+000A"), ("\u{1b}[2Jdb", "U+001B"), (&"x".repeat(101) as &str, "at most 100")]
    {
        let out = std::process::Command::new(bin("sluice-agent"))
            .env_clear()
            .env("APP_HOST", "127.0.0.1")
            .env("APP_PORT", "5432")
            .env("NAME", name)
            .env("REGISTRATION_JWT", "e30.eyJpc3MiOiJzbHVpY2UtcmVsYXkiLCJhdWQiOiJzbHVpY2UtYWdlbnQtcmVnaXN0cmF0aW9uIiwianRpIjoiaiIsImlhdCI6MSwicmVsYXlfdXJsIjoiaHR0cHM6Ly8xMjcuMC4wLjE6MSIsImNhX3BpbiI6ImFiIn0.sig")
            .env("STATE_DIR", dir.path().join("state"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("NAME=") && err.contains(why), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}
