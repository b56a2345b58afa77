//! `sluice backup` while the relay runs and writes, `sluice restore` into a fresh data
//! directory, and a NEW relay started from it: the agent comes back with the identity
//! it holds (no new enrollment), streams flow again, and the restored store is whole
//! (integrity check) and holds every row committed before the backup began.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, bin, on_postgres, test_dir, wait_for};

/// Every file of a directory with its contents.
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// Sends a message through `endpoint` and returns what came back.
fn echo(endpoint: &str, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(endpoint).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(msg).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    back
}

fn sluice(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("sluice")).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_writes_restores_into_a_new_relay_that_agents_rejoin_without_enrolling() {
    let dir = test_dir("backup-restore");
    let relay = Relay::start(&dir.path().join("a"));
    let echo_addr = echo_server().await;
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let agent = Agent::for_service(dir.path(), "db", echo_addr.port(), &jwt);
    relay.wait_status("db", "AVAILABLE", Some(&agent));
    assert_eq!(echo(&relay.endpoint("db"), b"before"), b"before");
    let identity = files_of(&agent.state_dir);
    let backup = dir.path().join("backup");
    let data = relay.data_dir();

    if on_postgres() {
        // The files only, and the operator is told to dump the database.
        let out = relay.cli(&["backup", backup.to_str().unwrap(), "--database-url", "postgres://u@localhost/db"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("NOT in this backup") && stdout.contains("pg_dump"), "{stdout}");
        assert!(backup.join("ca.key").exists() && !backup.join("sluice.db").exists());
        eprintln!("the rest of this test (SQLite's online backup, restore) runs without SLUICE_TEST_STORE=postgres");
        return;
    }

    // A writer creates customers in a loop, through the admin API, all along the backup.
    let created = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (created, stop, data) = (created.clone(), stop.clone(), data.clone());
        std::thread::spawn(move || {
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let name = format!("w{i}");
                let out = sluice(&["customers", "create", &name, "--data-dir", data.to_str().unwrap()]);
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                created.lock().push(name);
            }
        })
    };
    wait_for(Duration::from_secs(60), "the writer to commit some rows", || (created.lock().len() >= 10).then_some(()))
        .unwrap();
    let committed_before: Vec<String> = created.lock().clone();
    let out = relay.cli(&["backup", backup.to_str().unwrap()]);
    let during = created.lock().len() - committed_before.len();
    // A few more writes after the backup, then stop writing.
    let n = created.lock().len();
    wait_for(Duration::from_secs(60), "writes after the backup", || (created.lock().len() >= n + 3).then_some(()))
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), relay.log());
    assert!(stdout.contains("online backup") && stdout.contains("integrity check ok"), "{stdout}");
    eprintln!("{} rows committed before the backup began, {during} during it:\n{stdout}", committed_before.len());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777, 0o700);
    for f in ["ca.pem", "ca.key", "jwt-signing.key", "admin-token", "sluice.db", "backup.json"] {
        let mode = std::fs::metadata(backup.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }

    // The old relay is gone for good (its host lost, say).
    let (agent_port, ports) = (relay.agent_port, relay.ports);
    drop(relay);

    // Refused into a non-empty directory, with what to do.
    let out = sluice(&["restore", backup.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("is not empty") && err.contains("new --data-dir"), "{err}");

    let fresh = dir.path().join("b");
    let restored = fresh.join("relay-data");
    let out = sluice(&["restore", backup.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The restored store is whole and holds every row committed before the backup began.
    {
        let db = rusqlite::Connection::open(restored.join("sluice.db")).unwrap();
        let verdict: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(verdict, "ok");
        let mut st = db.prepare("SELECT name FROM customers").unwrap();
        let names: Vec<String> = st.query_map([], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect();
        let missing: Vec<&String> = committed_before.iter().filter(|n| !names.contains(n)).collect();
        assert!(missing.is_empty(), "rows committed before the backup are missing: {missing:?}");
        assert!(names.contains(&"acme".to_owned()));
    }

    // A NEW relay on the restored data directory, on the same agent port.
    let relay = Relay::start_on(&fresh, agent_port, ports, &[]);
    relay.wait_status("db", "AVAILABLE", Some(&agent));
    assert_eq!(echo(&relay.endpoint("db"), b"after the restore"), b"after the restore");
    assert_eq!(files_of(&agent.state_dir), identity, "the agent's identity changed: it enrolled again");
    assert!(!relay.log().contains("agent enrolled"), "the new relay enrolled an agent:\n{}", relay.log());
    assert!(relay.cli_ok(&["customers", "list"]).contains(committed_before.last().unwrap()));
}
