//! `sluice serve --database-url postgres://…` end to end: a relay keeping its state in a
//! real PostgreSQL server carries a stream; restarted, it finds its resource on the same
//! port; with PostgreSQL stopped, `/readyz` answers 503 naming the server, and 200 again
//! once it is back. The password in the URL never reaches the log.

use std::time::Duration;

use sluice_e2e::load::echo_server;
use sluice_e2e::services::Postgres;
use sluice_e2e::{Agent, Relay, http_get, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn echo_through(endpoint: &str) -> String {
    let mut s = TcpStream::connect(endpoint).await.unwrap();
    s.write_all(b"ping through a relay on PostgreSQL").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = String::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut back)).await.unwrap().unwrap();
    back
}

fn readyz(relay: &Relay) -> (u16, String) {
    http_get(&format!("127.0.0.1:{}", relay.admin_port), "/readyz").unwrap_or((0, String::new()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_postgres_serves_survives_restart_and_reports_the_server_down() {
    let dir = test_dir("serve-postgres");
    let mut pg = Postgres::start(&dir.path().join("pg-server"));
    pg.create_database("sluice");
    // Trust authentication ignores the password: it is there to be kept out of the log.
    let url = format!("postgres://postgres:hunter2-secret@127.0.0.1:{}/sluice", pg.port);
    let mut relay = Relay::start_with(dir.path(), &["--database-url", &url]);
    let echo = echo_server().await;
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let agent = Agent::for_service(dir.path(), "db", echo.port(), &jwt);
    relay.wait_status("db", "AVAILABLE", Some(&agent));
    let ep = relay.endpoint("db");
    assert_eq!(echo_through(&ep).await, "ping through a relay on PostgreSQL");
    assert!(!relay.data_dir().join("sluice.db").exists(), "no SQLite file beside PostgreSQL");
    let tables = pg.sql("sluice", "SELECT name || ':' || port FROM resources");
    assert_eq!(tables, format!("db:{}", ep.rsplit(':').next().unwrap()), "the resource is in PostgreSQL");

    // Restarted, the relay finds the resource on the same port, and the agent back.
    relay.restart();
    relay.wait_status("db", "AVAILABLE", Some(&agent));
    assert_eq!(relay.endpoint("db"), ep, "the port survives the restart");
    assert_eq!(echo_through(&ep).await, "ping through a relay on PostgreSQL");

    // PostgreSQL down: /readyz says so, naming the server (not the password).
    pg.stop();
    let server = format!("127.0.0.1:{}/sluice", pg.port);
    let body = wait_for(Duration::from_secs(30), "/readyz to report PostgreSQL down", || {
        let (code, body) = readyz(&relay);
        (code == 503 && body.contains(&server)).then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n--- relay log ---\n{}", relay.log()));
    eprintln!("/readyz while PostgreSQL is down: {body}");
    assert!(body.contains("check that the server runs"), "{body}");
    let line = wait_for(Duration::from_secs(10), "the error in the log", || {
        relay.log().lines().find(|l| l.contains("ERROR") && l.contains(&server)).map(str::to_owned)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    eprintln!("relay log: {line}");
    // Streams of connected agents do not need the store.
    assert_eq!(echo_through(&ep).await, "ping through a relay on PostgreSQL");

    // Back: ready again, and the store works.
    pg.start_again();
    wait_for(Duration::from_secs(30), "/readyz 200 once PostgreSQL is back", || {
        (readyz(&relay).0 == 200).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n--- relay log ---\n{}", relay.log()));
    relay.create_customer("globex");
    assert!(relay.log().contains("the database answers again"), "{}", relay.log());
    let logs = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name().to_string_lossy().starts_with("relay-") && e.file_name().to_string_lossy().ends_with(".log")
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(!logs.contains("hunter2-secret"), "the password reached the log");
    assert!(logs.contains("postgres://postgres:***@127.0.0.1"), "the URL is logged, redacted");
}
