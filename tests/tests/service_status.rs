//! Status that tells the truth: the agent reports whether its private service accepts
//! connections, `resources list` and `agents list` show it with the last error, and two
//! live sessions sharing one agent identity are called out.

use std::net::TcpListener;
use std::time::Duration;

use serde_json::Value;
use sluice_e2e::{Agent, Relay, test_dir, wait_for};

fn agents(relay: &Relay) -> Vec<Value> {
    let v: Value = serde_json::from_str(&relay.cli_ok(&["agents", "list", "-o", "json"])).unwrap();
    v.as_array().unwrap().clone()
}

#[test]
fn service_refusing_is_shown_apart_from_agent_connected() {
    let dir = test_dir("service-status");
    let relay = Relay::start(dir.path());
    // The "private service": a listener we can take away and bring back on the same port.
    let service = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port().to_string();
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let env = [
        ("APP_HOST", "127.0.0.1"),
        ("APP_PORT", port.as_str()),
        ("NAME", "orders-db"),
        ("REGISTRATION_JWT", jwt.as_str()),
        ("SLUICE_SERVICE_CHECK_SECS", "1"),
    ];
    let agent = Agent::start(dir.path(), "a", &env);
    relay.wait_status("orders-db", "AVAILABLE", Some(&agent));
    wait_for(Duration::from_secs(30), "the agent to report the service reachable", || {
        agents(&relay).first().is_some_and(|a| a["service"] == "reachable").then_some(())
    })
    .unwrap();
    let a = agents(&relay)[0].clone();
    assert_eq!(a["resource_name"], "orders-db");
    assert!(a["agent_id"].as_str().unwrap().starts_with("agt_"), "{a}");
    assert!(a["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{a}");
    assert!(!a["agent_version"].as_str().unwrap().is_empty(), "{a}");
    assert!(["ktls_splice", "userspace"].contains(&a["data_path"].as_str().unwrap()), "{a}");
    assert!(["ebpf", "userspace"].contains(&a["counter"].as_str().unwrap()), "{a}");
    let table = relay.cli_ok(&["agents", "list"]);
    let header = table.lines().next().unwrap();
    for col in ["Id", "Resource", "Host", "Version", "Peer", "Connected", "Path", "Counter", "Service", "Last error"] {
        assert!(header.contains(col), "agents list shows {col}: {table}");
    }

    // The service goes away: the agent stays connected, the status says the service refuses.
    drop(service);
    relay.wait_status("orders-db", "SERVICE_UNREACHABLE", Some(&agent));
    let r = relay.resource("orders-db").unwrap();
    assert_eq!(r["agents"], 1, "the agent is still connected");
    assert!(r["service_error"].as_str().unwrap().contains("refused"), "{r}");
    let a = agents(&relay)[0].clone();
    assert_eq!(a["service"], "unreachable");
    assert!(a["last_error"].as_str().unwrap().contains(&format!("127.0.0.1:{port}")), "{a}");
    let ext = relay.cli_ok(&["resources", "list", "--extended"]);
    assert!(ext.contains("SERVICE_UNREACHABLE") && ext.contains("refused"), "{ext}");
    // A platform client is still turned away at once, as before.
    let ep = relay.endpoint("orders-db");
    let mut c = std::net::TcpStream::connect(&ep).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 1];
    let got = std::io::Read::read(&mut c, &mut buf);
    assert!(matches!(got, Ok(0) | Err(_)), "the client is closed or reset, not left hanging: {got:?}");

    // It comes back on the same port: AVAILABLE again.
    let _service = TcpListener::bind(format!("127.0.0.1:{port}")).unwrap();
    relay.wait_status("orders-db", "AVAILABLE", Some(&agent));
    assert_eq!(agents(&relay)[0]["service"], "reachable");
}

#[test]
fn two_live_sessions_of_one_identity_are_called_out() {
    let dir = test_dir("shared-identity");
    let relay = Relay::start(dir.path());
    let service = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port().to_string();
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let env =
        [("APP_HOST", "127.0.0.1"), ("APP_PORT", port.as_str()), ("NAME", "files"), ("REGISTRATION_JWT", jwt.as_str())];
    let first = Agent::start(dir.path(), "first", &env);
    relay.wait_status("files", "AVAILABLE", Some(&first));
    // The state volume copied to a second container.
    let copy = dir.path().join("agent-copy-state");
    let ok = std::process::Command::new("cp").arg("-a").arg(&first.state_dir).arg(&copy).status().unwrap();
    assert!(ok.success());
    let mut cmd_env: Vec<(&str, &str)> = env.to_vec();
    let copy_s = copy.to_str().unwrap().to_owned();
    cmd_env.push(("STATE_DIR", &copy_s));
    let second = Agent::start(dir.path(), "copy", &cmd_env);
    wait_for(Duration::from_secs(30), "two sessions", || (agents(&relay).len() == 2).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", second.proc.log_text(), relay.log()));
    let list = agents(&relay);
    assert_eq!(list[0]["agent_id"], list[1]["agent_id"], "the copied state is the same identity");
    assert!(list.iter().all(|a| !a["shared_identity_with"].as_array().unwrap().is_empty()), "{list:?}");
    let out = relay.cli(&["agents", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success());
    assert!(err.contains("warning") && err.contains("STATE_DIR"), "{err}");
    // The registry shows the twin a moment before the relay's line is written.
    wait_for(Duration::from_secs(10), "the relay's warning about a shared identity", || {
        relay.log().contains("two live sessions share one agent identity").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
}
