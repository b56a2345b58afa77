//! Store faults are loud (#11 row 9): a second relay on one data directory refuses to
//! start and changes nothing; a database file deleted under the running relay is
//! noticed (`/readyz` 503 naming the file, an error in the log) and a restart refuses
//! to create an empty one; a full disk is named, with the file and the fix, at run time
//! (admin calls) and at start. Under `SLUICE_TEST_STORE=postgres` the tests about the
//! SQLite file skip themselves (tests/tests/postgres_store.rs covers PostgreSQL down).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sluice_e2e::{Proc, Relay, bin, free_port, http_get, skip_unless_sqlite, test_dir, wait_for};

/// Runs `sluice serve` once more on `relay`'s data directory (fresh ports, `extra`
/// flags) and returns its exit code (None: still running after 30 s, then killed) and
/// its output.
fn serve_again(relay: &Relay, label: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin("sluice"));
    cmd.args(["serve", "--data-dir"])
        .arg(relay.data_dir())
        .args(["--agent-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--resource-ports", &format!("{}-{}", relay.ports.0, relay.ports.1)])
        .args(extra);
    let mut p = Proc::spawn(cmd, relay.dir.join(format!("serve-{label}.log")));
    let code = p.wait_exit(Duration::from_secs(30));
    p.kill();
    (code, p.log_text())
}

fn readyz(relay: &Relay) -> (u16, String) {
    http_get(&format!("127.0.0.1:{}", relay.admin_port), "/readyz").unwrap_or((0, String::new()))
}

#[test]
fn a_second_relay_on_the_same_data_dir_refuses_and_changes_nothing() {
    let dir = test_dir("second-relay");
    let mut relay = Relay::start(dir.path());
    relay.create_customer("acme");
    let url_file = relay.data_dir().join("admin-url");
    let url_before = std::fs::read_to_string(&url_file).unwrap();
    let mtime_before = std::fs::metadata(&url_file).unwrap().modified().unwrap();

    let (code, out) = serve_again(&relay, "second", &[]);
    eprintln!("second relay said:\n{out}");
    assert!(matches!(code, Some(c) if c != 0), "the second relay must exit non-zero at once, got {code:?}:\n{out}");
    let data_dir = relay.data_dir().display().to_string();
    assert!(out.contains(&format!("the data directory {data_dir} is in use by another relay")), "{out}");
    let pid = relay.proc.as_ref().unwrap().child.id();
    assert!(out.contains(&format!("pid {pid}")), "names the holder's pid: {out}");
    assert!(out.contains(&format!("admin API 127.0.0.1:{}", relay.admin_port)), "{out}");

    assert_eq!(std::fs::read_to_string(&url_file).unwrap(), url_before, "the CLI's admin-url file is untouched");
    assert_eq!(std::fs::metadata(&url_file).unwrap().modified().unwrap(), mtime_before);
    assert!(relay.proc.as_mut().unwrap().is_running(), "the first relay still runs");
    assert!(relay.cli_ok(&["customers", "list"]).contains("acme"), "the CLI still reaches the first relay");
    assert_eq!(readyz(&relay).0, 200);
}

#[test]
fn a_deleted_database_is_noticed_and_a_restart_refuses_an_empty_one() {
    if skip_unless_sqlite("a_deleted_database_is_noticed…", "it deletes the relay's SQLite file") {
        return;
    }
    let dir = test_dir("db-deleted");
    let mut relay = Relay::start(dir.path());
    let customer = relay.create_customer("acme");
    assert_eq!(readyz(&relay).0, 200);
    let db = relay.data_dir().join("sluice.db");
    std::fs::remove_file(&db).unwrap();

    let db_name = db.display().to_string();
    let body = wait_for(Duration::from_secs(20), "/readyz to report the deleted database", || {
        let (code, body) = readyz(&relay);
        (code == 503 && body.contains(&db_name)).then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n--- relay log ---\n{}", relay.log()));
    eprintln!("/readyz: {body}");
    assert!(body.contains("was deleted"), "{body}");
    // The error is logged once the copy is saved (just after /readyz turns 503).
    let line = wait_for(Duration::from_secs(10), "the error in the log", || {
        relay.log().lines().find(|l| l.contains("ERROR") && l.contains("was deleted")).map(str::to_owned)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    eprintln!("relay log: {line}");
    assert!(line.contains("sluice.db.recovered-"), "the log says where the copy is: {line}");
    let metrics = http_get(&format!("127.0.0.1:{}", relay.admin_port), "/metrics").unwrap().1;
    assert!(metrics.contains("sluice_relay_store_fault 1"), "{metrics}");

    // A supervisor's restart must not bring the relay back with an empty database.
    relay.stop();
    let (code, out) = serve_again(&relay, "no-db", &[]);
    eprintln!("restart said:\n{out}");
    assert!(matches!(code, Some(c) if c != 0), "a restart without the database must refuse, got {code:?}:\n{out}");
    assert!(out.contains(&format!("the database {db_name} is missing")), "{out}");
    assert!(out.contains("--recreate-database") && out.contains("EMPTY"), "{out}");
    assert!(!db.exists(), "no empty database was created");

    // The way back: the copy the relay saved, as the message says.
    let copy = recovered_copy(&relay.data_dir()).expect("a saved copy");
    assert!(out.contains(&copy.display().to_string()), "the refusal names the saved copy: {out}");
    for f in ["sluice.db-wal", "sluice.db-shm"] {
        let _ = std::fs::remove_file(relay.data_dir().join(f));
    }
    std::fs::rename(&copy, &db).unwrap();
    relay.restart();
    assert!(relay.cli_ok(&["customers", "list"]).contains(&customer), "every customer is back");
}

/// The `sluice.db.recovered-*` copy in `dir`.
fn recovered_copy(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("sluice.db.recovered-"))
        .map(|e| e.path())
}

/// A small tmpfs mounted at a path, unmounted on drop.
struct SmallVolume(PathBuf);

impl SmallVolume {
    fn mount(at: &Path, size: &str) -> Result<SmallVolume, String> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "sluice-test-tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(SmallVolume(at.to_owned()))
    }

    /// Writes a file until the volume is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        for chunk in [65536usize, 4096, 512, 1] {
            while f.write_all(&vec![0u8; chunk]).is_ok() {}
        }
        let _ = f.sync_all();
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_named_at_run_time_and_at_start() {
    if skip_unless_sqlite("a_full_disk_is_named…", "it fills the volume holding the relay's SQLite file") {
        return;
    }
    let dir = test_dir("disk-full");
    let volume = match SmallVolume::mount(&dir.path().join("relay-data"), "4m") {
        Ok(v) => v,
        Err(why) => return eprintln!("skipped: cannot mount a small tmpfs as the data directory ({why})"),
    };
    let mut relay = Relay::start(dir.path());
    relay.create_customer("before-full");
    volume.fill();

    // At run time: an admin write fails with the file and the fix, the relay keeps running.
    let db = relay.data_dir().join("sluice.db").display().to_string();
    let mut refusal = None;
    for i in 0..40 {
        let out = relay.cli(&["customers", "create", &format!("after-full-{i}")]);
        if !out.status.success() {
            refusal = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
    }
    let refusal = refusal.unwrap_or_else(|| panic!("no write failed on a full disk\n{}", relay.log()));
    eprintln!("CLI said: {refusal}");
    assert!(refusal.contains("503"), "{refusal}");
    assert!(refusal.contains(&format!("cannot write {db}")), "{refusal}");
    assert!(refusal.contains("disk is full") && refusal.contains("free space on the volume holding"), "{refusal}");
    let log = relay.log();
    let line = log.lines().find(|l| l.contains("ERROR") && l.contains(&db)).unwrap_or_else(|| panic!("{log}"));
    eprintln!("relay log: {line}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(relay.proc.as_mut().unwrap().is_running(), "the relay survives a full disk");
    assert!(relay.cli_ok(&["customers", "list"]).contains("before-full"), "reads still work");

    // At start: the file that cannot be written and the fix.
    relay.stop();
    let (code, out) = serve_again(&relay, "full", &[]);
    eprintln!("start on a full disk said:\n{out}");
    assert!(matches!(code, Some(c) if c != 0), "{code:?}: {out}");
    let data_dir = relay.data_dir().display().to_string();
    let error = out.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{out}"));
    assert!(error.contains(&format!("cannot write {data_dir}/")), "names the file: {error}");
    assert!(error.contains("No space left on device") || error.contains("disk is full"), "{error}");
    assert!(error.contains(&format!("free space on the volume holding {data_dir}")), "{error}");
    drop(relay);
    drop(volume);
}
