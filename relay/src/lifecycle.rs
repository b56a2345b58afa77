//! The operator's commands around the relay's life, beside `sluice serve`:
//! `sluice admin-token rotate` (through the admin API, [`crate::admin::admin_token`]),
//! `sluice backup` and `sluice restore` (on the files, [`crate::state::backup`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::admin::admin_token::AdminTokenRotated;
use crate::cli::{AdminClient, AdminConn, Output};
use crate::state::backup::{self, StoreLocation};
use crate::state::store::redacted_url;

/// `sluice admin-token …`.
#[derive(Debug, Subcommand)]
pub enum AdminTokenCmd {
    /// Replace the admin token without a restart: the new one works on every relay
    /// sharing the store at once, the old one is refused from then on. The relay
    /// writes the new token into its data directory (admin-token, 0600) and the command
    /// prints it on stdout. Needs the current admin token (or an admin API token).
    Rotate,
}

/// Runs `sluice admin-token …`.
pub async fn admin_token(conn: &AdminConn, cmd: AdminTokenCmd) -> Result<()> {
    let api = AdminClient::new(conn)?;
    match cmd {
        AdminTokenCmd::Rotate => {
            let r: AdminTokenRotated = api.call("POST", "/v1/admin-token/rotate", None).await?;
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{}", r.token);
            }
            eprintln!("{}", rotation_report(&r));
        }
    }
    Ok(())
}

/// What a rotation did, for the operator (stderr).
fn rotation_report(r: &AdminTokenRotated) -> String {
    let mut s = format!(
        "Admin token rotated ({}): the old one is refused from now on. The relay {} wrote the new one to {} on its \
         host.",
        r.id,
        r.relay_id,
        r.file.display()
    );
    if !r.other_relays.is_empty() {
        s.push_str(&format!(
            " The other relays ({}) accept it already; copy that file into their data directories too (their \
             admin-token files still hold the old token), or pass --admin-token there.",
            r.other_relays.join(", ")
        ));
    }
    s
}

/// `sluice backup PATH`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Directory to write the backup into (created with mode 0700; refused when it
    /// exists and is not empty).
    pub path: PathBuf,
    /// The relay's data directory (it may be running: the backup takes no lock).
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    pub data_dir: PathBuf,
    /// The relay's --database-url, when it is not the default SQLite file in the data
    /// directory. With a postgres:// URL the backup holds the files only: dump the
    /// database with pg_dump.
    #[arg(long, env = "SLUICE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// Runs `sluice backup`.
pub fn run_backup(args: &BackupArgs) -> Result<()> {
    let store = StoreLocation::of(&args.data_dir, args.database_url.as_deref());
    let m = backup::backup(&args.data_dir, &store, &args.path)?;
    println!("Backup written to {} ({}).", args.path.display(), m.files.join(", "));
    match &store {
        StoreLocation::Sqlite(db) => println!(
            "Store: {} copied with SQLite's online backup (one consistent snapshot; integrity check ok): {}.",
            db.display(),
            rows(&m.rows)
        ),
        StoreLocation::Postgres(url) => println!(
            "Store: PostgreSQL ({}): NOT in this backup. Dump it now, e.g. `pg_dump --format=custom --file {}/store.pgdump \
             \"$SLUICE_DATABASE_URL\"` (restore with pg_restore into an empty database, and start the relay with \
             --database-url pointing there).",
            redacted_url(url),
            args.path.display()
        ),
    }
    Ok(())
}

/// `sluice restore PATH --data-dir NEW`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A directory `sluice backup` wrote.
    pub path: PathBuf,
    /// The data directory to create from it: new, or empty.
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: PathBuf,
}

/// Runs `sluice restore`.
pub fn run_restore(args: &RestoreArgs) -> Result<()> {
    let (m, restored) = backup::restore(&args.path, &args.data_dir)?;
    let dir = args.data_dir.display();
    println!(
        "Restored the backup of {} (sluice {}) into {dir} ({}).",
        time_of(m.created_at),
        m.sluice_version,
        m.files.join(", ")
    );
    match restored {
        Some(r) => println!("Store: {dir}/sluice.db, integrity check ok: {}.", rows(&r)),
        None => println!(
            "Store: PostgreSQL — restore its dump (pg_restore) and pass that database as --database-url when starting."
        ),
    }
    println!(
        "Start the relay with --data-dir {dir} and the same --agent-listen and --public-url as before: agents reconnect \
         with the identities they hold, without enrolling again."
    );
    Ok(())
}

fn rows(r: &std::collections::BTreeMap<String, u64>) -> String {
    r.iter().map(|(t, n)| format!("{n} {t}")).collect::<Vec<_>>().join(", ")
}

fn time_of(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix)).to_string()
}
