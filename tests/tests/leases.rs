//! Endpoint leases: only the job that holds a lease reaches a leased-only resource.
//! Another tenant's job — another source address, no lease, an expired lease, a spent
//! lease, another resource's lease — is refused, each in its own test; the holder's
//! psql works; a lease made on one relay of a cluster is honoured by the others.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use sluice_e2e::cluster::Cluster;
use sluice_e2e::load::echo_server;
use sluice_e2e::services::Postgres;
use sluice_e2e::{Agent, Relay, free_port_range, http_get, split_endpoint, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a refused or cut connection may take to show it (generous: half machine speed).
const WAIT: Duration = Duration::from_secs(20);

/// A relay with its own lease port range (tests run in parallel) and `extra` flags.
fn relay_with_leases(dir: &std::path::Path, extra: &[&str]) -> Relay {
    let (a, b) = free_port_range(8);
    let mut args = vec!["--lease-ports".to_owned(), format!("{a}-{b}")];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Relay::start_with(dir, &args)
}

/// A relay and an agent of resource `name` in front of an echo service, AVAILABLE.
async fn echo_resource(dir: &std::path::Path, name: &str, extra: &[&str]) -> (Relay, Agent) {
    let relay = relay_with_leases(dir, extra);
    let echo = echo_server().await;
    let cid = relay.create_customer("tenant-a");
    let agent = Agent::for_service(dir, name, echo.port(), &relay.customer_jwt(&cid));
    relay.wait_status(name, "AVAILABLE", Some(&agent));
    (relay, agent)
}

/// `sluice leases create NAME …` as JSON.
fn create_lease(relay: &Relay, resource: &str, args: &[&str]) -> Value {
    let mut all = vec!["leases", "create", resource];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--output", "json"]);
    serde_json::from_str(&relay.cli_ok(&all)).unwrap()
}

fn endpoint_of(lease: &Value) -> String {
    lease["endpoint"].as_str().unwrap().to_owned()
}

/// Connects to `addr` from `source` (a local address, e.g. 127.0.0.2).
async fn connect_from(source: &str, addr: &str) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().unwrap();
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    tokio::time::timeout(WAIT, socket.connect(addr)).await.map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// One round trip through the echo service: true if the bytes came back.
async fn echoes(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    matches!(tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await, Ok(Ok(_)) if &buf == b"ping\n")
}

/// Whether a new connection from `source` to `addr` reaches the echo service.
async fn reaches(source: &str, addr: &str) -> bool {
    match connect_from(source, addr).await {
        Ok(mut s) => echoes(&mut s).await,
        Err(_) => false,
    }
}

/// The relay's count of connections refused by lease admission with `reason`.
fn refused(relay: &Relay, reason: &str) -> u64 {
    let (_, body) = http_get(&format!("127.0.0.1:{}", relay.admin_port), "/metrics").unwrap();
    let key = format!("sluice_relay_lease_refused_total{{reason=\"{reason}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&key)).map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_only_resource_refuses_on_its_fixed_port() {
    let dir = test_dir("lease-fixed");
    let (relay, _agent) = echo_resource(dir.path(), "orders", &[]).await;
    let fixed = relay.endpoint("orders");
    assert!(reaches("127.0.0.1", &fixed).await, "an open resource's fixed port admits");
    relay.cli_ok(&["resources", "update", "orders", "--access", "leased"]);
    assert_eq!(relay.resource("orders").unwrap()["access"], "leased");
    assert!(!reaches("127.0.0.1", &fixed).await, "a leased-only resource's fixed port must refuse");
    assert!(refused(&relay, "leased_only") >= 1, "counted as leased_only");
    assert!(relay.log().contains("the resource is leased-only"), "the refusal is logged");
    // The lease holder still gets in, on the lease's own port.
    let lease = create_lease(&relay, "orders", &["--ttl", "15m"]);
    assert!(reaches("127.0.0.1", &endpoint_of(&lease)).await, "the lease holder reaches the resource");
    // Open again: the fixed port admits.
    relay.cli_ok(&["resources", "update", "orders", "--access", "open"]);
    assert!(reaches("127.0.0.1", &fixed).await, "open again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_source_address_is_refused() {
    let dir = test_dir("lease-source");
    let (relay, _agent) = echo_resource(dir.path(), "orders", &[]).await;
    relay.cli_ok(&["resources", "update", "orders", "--access", "leased"]);
    let lease = create_lease(&relay, "orders", &["--ttl", "15m", "--source", "127.0.0.1/32"]);
    let ep = endpoint_of(&lease);
    assert!(!reaches("127.0.0.2", &ep).await, "a job on another address must be refused");
    assert_eq!(refused(&relay, "source"), 1);
    assert!(reaches("127.0.0.1", &ep).await, "the holder's address is admitted");
    let shown: Value = serde_json::from_str(&relay.cli_ok(&["leases", "list", "--output", "json"])).unwrap();
    assert_eq!(shown[0]["connections_used"], 1, "the stranger's try did not cost the holder's budget");
    // The refused attempt is in the audit trail: who tried, on which lease, why refused.
    let lease_id = lease["id"].as_str().unwrap().to_owned();
    let record = wait_for(WAIT, "the refusal in the audit trail", || {
        let all: Value = serde_json::from_str(&relay.cli_ok(&["audit", "--output", "json"])).ok()?;
        all.as_array()?
            .iter()
            .find(|r| r["end"] == "refused" && r["client_addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.2:")))
            .cloned()
    })
    .unwrap();
    assert_eq!(record["lease_id"], lease_id.as_str(), "{record}");
    assert!(record["end_detail"].as_str().unwrap().starts_with("source"), "{record}");
    assert_eq!((record["bytes_in"].as_u64(), record["bytes_out"].as_u64()), (Some(0), Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lease_no_way_in() {
    let dir = test_dir("lease-none");
    let (relay, _agent) = echo_resource(dir.path(), "orders", &[]).await;
    relay.cli_ok(&["resources", "update", "orders", "--access", "leased"]);
    // Somebody else's lease exists; a port of the range that no lease holds listens not.
    let lease = create_lease(&relay, "orders", &["--ttl", "15m"]);
    let (host, port) = split_endpoint(&endpoint_of(&lease));
    assert!(!reaches("127.0.0.1", &format!("{host}:{}", port + 1)).await, "an unleased lease port is closed");
    assert!(!reaches("127.0.0.1", &relay.endpoint("orders")).await, "the fixed port refuses");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_refused() {
    let dir = test_dir("lease-expired");
    let (relay, _agent) = echo_resource(dir.path(), "orders", &[]).await;
    relay.cli_ok(&["resources", "update", "orders", "--access", "leased"]);
    let lease = create_lease(&relay, "orders", &["--ttl", "2s"]);
    let ep = endpoint_of(&lease);
    let id = lease["id"].as_str().unwrap().to_owned();
    wait_for(WAIT, "the lease to expire", || {
        let l: Value = serde_json::from_str(&relay.cli_ok(&["leases", "list", "--output", "json"])).unwrap();
        (l[0]["state"] == "ended" && l[0]["end_reason"] == "expired").then_some(())
    })
    .unwrap();
    assert!(!reaches("127.0.0.1", &ep).await, "an expired lease must admit nobody");
    let one = relay.cli_ok(&["leases", "list", "--output", "json"]);
    assert!(one.contains(&id), "the ended lease is still listed: {one}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_lease_is_refused() {
    let dir = test_dir("lease-spent");
    let (relay, _agent) = echo_resource(dir.path(), "orders", &[]).await;
    relay.cli_ok(&["resources", "update", "orders", "--access", "leased"]);
    let lease = create_lease(&relay, "orders", &["--ttl", "15m", "--max-connections", "1"]);
    let ep = endpoint_of(&lease);
    let mut first = connect_from("127.0.0.1", &ep).await.unwrap();
    assert!(echoes(&mut first).await, "the first connection is within the budget");
    assert!(!reaches("127.0.0.1", &ep).await, "a second connection must be refused: the budget is spent");
    assert_eq!(refused(&relay, "spent"), 1);
    assert!(echoes(&mut first).await, "the admitted connection keeps working");
    drop(first);
    wait_for(WAIT, "the spent lease to end with its last connection", || {
        let l: Value = serde_json::from_str(&relay.cli_ok(&["leases", "list", "--output", "json"])).unwrap();
        (l[0]["state"] == "ended" && l[0]["end_reason"] == "spent").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
}

/// A service that greets every connection with its name (to tell resources apart).
async fn greeter(name: &'static str) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let mut sink = [0u8; 64];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    port
}

async fn greeting(addr: &str) -> Option<String> {
    let mut s = connect_from("127.0.0.1", addr).await.ok()?;
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.ok()?.ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_resources_lease_does_not_reach_this_resource() {
    let dir = test_dir("lease-other");
    let relay = relay_with_leases(dir.path(), &[]);
    let (a, b) = (greeter("tenant-a").await, greeter("tenant-b").await);
    let ca = relay.create_customer("tenant-a");
    let cb = relay.create_customer("tenant-b");
    let agent_a = Agent::for_service(dir.path(), "db-a", a, &relay.customer_jwt(&ca));
    let agent_b = Agent::for_service(dir.path(), "db-b", b, &relay.customer_jwt(&cb));
    relay.wait_status("db-a", "AVAILABLE", Some(&agent_a));
    relay.wait_status("db-b", "AVAILABLE", Some(&agent_b));
    relay.cli_ok(&["resources", "update", "db-b", "--access", "leased"]);
    let lease_a = create_lease(&relay, "db-a", &["--ttl", "15m"]);
    assert_eq!(greeting(&endpoint_of(&lease_a)).await.as_deref(), Some("tenant-a"), "A's lease reaches A only");
    assert_eq!(greeting(&relay.endpoint("db-b")).await, None, "B's fixed port refuses A's job");
    let lease_b = create_lease(&relay, "db-b", &["--ttl", "15m"]);
    assert_ne!(lease_a["port"], lease_b["port"], "each lease has its own port");
    assert_eq!(greeting(&endpoint_of(&lease_b)).await.as_deref(), Some("tenant-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_ends_the_lease_and_cuts_open_streams_after_the_grace() {
    let dir = test_dir("lease-delete");
    let (relay, _agent) = echo_resource(dir.path(), "orders", &["--lease-grace", "6s"]).await;
    relay.cli_ok(&["resources", "update", "orders", "--access", "leased"]);
    let lease = create_lease(&relay, "orders", &["--ttl", "15m"]);
    let (ep, id) = (endpoint_of(&lease), lease["id"].as_str().unwrap().to_owned());
    let mut open = connect_from("127.0.0.1", &ep).await.unwrap();
    assert!(echoes(&mut open).await);
    relay.cli_ok(&["leases", "delete", &id]);
    let deleted_at = std::time::Instant::now();
    assert!(!reaches("127.0.0.1", &ep).await, "a deleted lease admits no new connection");
    if deleted_at.elapsed() < Duration::from_secs(4) {
        assert!(echoes(&mut open).await, "within the grace the open stream keeps working");
    }
    // After the grace the relay cuts it: a read ends (reset or EOF).
    let mut buf = [0u8; 16];
    let cut = tokio::time::timeout(Duration::from_secs(6) + WAIT, open.read(&mut buf)).await;
    assert!(matches!(cut, Ok(Ok(0)) | Ok(Err(_))), "the open stream must be cut after the grace: {cut:?}");
    assert!(deleted_at.elapsed() >= Duration::from_secs(5), "not before the grace ({:?})", deleted_at.elapsed());
    let shown: Value = serde_json::from_str(&relay.cli_ok(&["leases", "list", "--output", "json"])).unwrap();
    assert_eq!(shown[0]["end_reason"], "deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holders_psql_works() {
    let dir = test_dir("lease-psql");
    let pg = Postgres::start(dir.path());
    let relay = relay_with_leases(dir.path(), &[]);
    let cid = relay.create_customer("tenant-a");
    let agent = Agent::for_service(dir.path(), "orders-db", pg.port, &relay.customer_jwt(&cid));
    relay.wait_status("orders-db", "AVAILABLE", Some(&agent));
    relay.cli_ok(&["resources", "update", "orders-db", "--access", "leased"]);
    let lease = create_lease(&relay, "orders-db", &["--ttl", "15m", "--source", "127.0.0.1/32"]);
    let (host, port) = split_endpoint(&endpoint_of(&lease));
    let out = std::process::Command::new("psql")
        .args(["-X", "-At", "-h", &host, "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
        .args(["-c", "select 1"])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    assert!(out.status.success(), "psql through the lease failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    // The table form shows the endpoint and the id too.
    let table = relay.cli_ok(&["leases", "list"]);
    assert!(table.contains(&endpoint_of(&lease)) && table.contains(lease["id"].as_str().unwrap()), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_made_on_one_relay_is_honoured_on_another_with_one_budget() {
    let dir = test_dir("lease-cluster");
    let (a, b) = free_port_range(8);
    let range = format!("{a}-{b}");
    let cluster = Cluster::start(dir.path(), 2, &["--lease-ports", &range]);
    let echo = echo_server().await;
    let r1 = &cluster.relays[0];
    let cid = r1.create_customer("tenant-a");
    let agent = Agent::for_service(dir.path(), "orders", echo.port(), &r1.customer_jwt(&cid));
    r1.wait_status("orders", "AVAILABLE", Some(&agent));
    cluster.relays[1].wait_status("orders", "AVAILABLE", Some(&agent));
    r1.cli_ok(&["resources", "update", "orders", "--access", "leased"]);
    let lease = create_lease(r1, "orders", &["--ttl", "15m", "--max-connections", "2"]);
    let port = lease["port"].as_u64().unwrap() as u16;
    let on_relay2 = cluster.endpoint(1, port);
    assert!(on_relay2.starts_with("127.0.0.2:"));
    // Relay 2 learns the lease from the store within its refresh (1 s) — allow 20 s.
    let t = std::time::Instant::now();
    let mut first = None;
    wait_for(WAIT, "relay 2 to honour the lease", || {
        let rt = tokio::runtime::Handle::current();
        let mut s = tokio::task::block_in_place(|| rt.block_on(connect_from("127.0.0.1", &on_relay2))).ok()?;
        tokio::task::block_in_place(|| rt.block_on(echoes(&mut s))).then_some(())?;
        first = Some(s);
        Some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    eprintln!("relay 2 honoured a lease made on relay 1 after {:?}", t.elapsed());
    // One budget for both relays: a failed try above may have cost one; the budget is 2.
    let used = |c: &Cluster| -> u64 {
        let l: Value = serde_json::from_str(&c.relays[0].cli_ok(&["leases", "list", "--output", "json"])).unwrap();
        l[0]["connections_used"].as_u64().unwrap()
    };
    if used(&cluster) < 2 {
        let mut second = connect_from("127.0.0.1", &cluster.endpoint(0, port)).await.unwrap();
        assert!(echoes(&mut second).await, "relay 1 admits the second connection of the budget");
    }
    assert!(!reaches("127.0.0.1", &cluster.endpoint(0, port)).await, "relay 1: the shared budget is spent");
    assert!(!reaches("127.0.0.1", &on_relay2).await, "relay 2: the shared budget is spent");
    assert_eq!(used(&cluster), 2);
    drop(first);
}
