//! The admin CLI: `sluice customers …`, `sluice resources …`, `sluice tokens …`,
//! `sluice api-tokens …`, `sluice audit` and `sluice streams` talk to a relay's admin API and print tables (default) or JSON
//! (`--output json`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::admin::ops::{AgentView, JwtIssued, JwtRequest, JwtRevoked, RegistrationJwtView, ResourceView};
use crate::admin::ops::{LeaseRequest, LeaseView};
use crate::data::streams::StreamView;
use crate::state::pki::files;
use crate::state::store::Customer;

/// How the CLI finds and authenticates to a relay.
#[derive(Debug, Clone, Args)]
pub struct AdminConn {
    /// URL of the relay's admin API, e.g. http://127.0.0.1:8080. Default: read from the
    /// data directory of a relay on this host.
    #[arg(long, env = "SLUICE_ADMIN_URL", global = true)]
    pub admin_url: Option<String>,
    /// Admin token the relay printed on first start. Default: read from the data directory.
    #[arg(long, env = "SLUICE_ADMIN_TOKEN", global = true, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Data directory of a relay on this host (to find its admin URL and token).
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data", global = true)]
    pub data_dir: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// CA certificate (PEM) to trust for an https:// admin URL, besides the system's roots
    /// and the data directory's ca.pem (which signs the certificate of `--admin-tls`).
    #[arg(long, env = "SLUICE_ADMIN_CA", value_name = "FILE", global = true)]
    pub admin_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum CustomersCmd {
    /// Create a customer and print its id.
    Create {
        /// Customer name (unique).
        name: String,
    },
    /// List customers.
    List {
        /// Comma-separated columns to show: Id,Name,Created.
        #[arg(long, value_delimiter = ',')]
        columns: Option<Vec<String>>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ResourcesCmd {
    /// Print a registration JWT (only the JWT, on stdout) for an agent:
    /// `export REGISTRATION_JWT=$(sluice resources registration-jwt --customer-id ID)`.
    #[command(name = "registration-jwt")]
    RegistrationJwt {
        /// Agents register resources of this customer (with the agent's NAME).
        #[arg(long, conflicts_with = "org_only")]
        customer_id: Option<String>,
        /// Agents register org-level resources (no customer).
        #[arg(long)]
        org_only: bool,
        /// Regenerate the JWT of this existing resource: its id, or its name (with
        /// --customer-id when several customers have a resource of that name).
        #[arg(long)]
        resource_id: Option<String>,
        /// With --resource-id: revoke every older JWT and agent certificate of the
        /// resource and disconnect its agents now.
        #[arg(long, requires = "resource_id")]
        rotate: bool,
        /// Make the JWT expire after this long (e.g. 90s, 30m, 24h, 7d, "1h 30m", or a
        /// number of seconds; at most 100 years). Default: never.
        #[arg(long, value_parser = parse_duration_secs)]
        expires_in: Option<u64>,
    },
    /// List resources: Name, Status, Customer (and more with --extended).
    List {
        /// Also show Id, CustomerId, Endpoint, Agents, Last seen, Service error, and Port
        /// error (why a PORT_BLOCKED resource's port does not listen).
        #[arg(long)]
        extended: bool,
        /// Comma-separated columns to show (any of the extended ones).
        #[arg(long, value_delimiter = ',')]
        columns: Option<Vec<String>>,
    },
    /// Print the host:port a platform job connects to for a resource.
    ///
    /// Names are display names: quote them (`sluice resources endpoint "Acme MS SQL"`).
    /// When several customers have a resource of that name, add --customer-id.
    Endpoint {
        /// Resource id, or its name (NAME of its agents).
        name_or_id: String,
        /// Look the name up among this customer's resources.
        #[arg(long)]
        customer_id: Option<String>,
    },
    /// Delete a resource: its port closes, its agents are disconnected, its JWTs revoked.
    Delete {
        /// Resource id, or its name.
        name_or_id: String,
        /// Look the name up among this customer's resources (when several customers have
        /// a resource of that name).
        #[arg(long)]
        customer_id: Option<String>,
        /// Exit 0 (with a note on stderr) when there is no such resource, for scripts
        /// that delete idempotently.
        #[arg(long)]
        ignore_not_found: bool,
    },
    /// Change a resource: `--access leased` makes its fixed port refuse every connection
    /// (platform jobs then connect through leases: `sluice leases create`); `--access
    /// open` (the default) admits every connection on it again.
    Update {
        /// Resource id, or its name.
        name_or_id: String,
        #[arg(long, value_parser = ["leased", "open"])]
        access: String,
    },
}

/// `sluice leases …`.
#[derive(Debug, Subcommand)]
pub enum LeasesCmd {
    /// Create an endpoint lease for one platform execution and print its endpoint
    /// (host:port) and id. Only connections from --source, within --max-connections and
    /// before --ttl runs out reach the resource through it.
    Create {
        /// Resource id, or its name.
        resource: String,
        /// How long the lease lives (e.g. 90s, 15m, 2h; 1 s to 24 h).
        #[arg(long, value_parser = parse_duration_secs)]
        ttl: u64,
        /// Connections it admits in all (across every relay). Default: no budget.
        #[arg(long)]
        max_connections: Option<u32>,
        /// The network its connections must come from, e.g. 10.1.2.3/32.
        #[arg(long)]
        source: Option<String>,
    },
    /// List the active leases and those ended within the hour.
    List {
        /// Only the leases of this resource (id or name).
        #[arg(long)]
        resource: Option<String>,
        /// Comma-separated columns: Id,Resource,Endpoint,State,Expires,Connections,Source,Ended,Open.
        #[arg(long, value_delimiter = ',')]
        columns: Option<Vec<String>>,
    },
    /// End a lease now: new connections are refused, open streams are cut after the
    /// relay's --lease-grace.
    Delete {
        /// The lease's id (lse_…).
        id: String,
        /// Exit 0 (with a note on stderr) when there is no such lease.
        #[arg(long)]
        ignore_not_found: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// List connected agents: Id, Resource, Host, Version, Peer, Connected, Path,
    /// Counter, Service (reachable/unreachable/unknown) and the last service error.
    /// Warns when two live sessions share one agent identity (a copied STATE_DIR).
    List {
        /// Only agents of this resource (name or id).
        #[arg(long)]
        resource: Option<String>,
        /// Comma-separated columns to show.
        #[arg(long, value_delimiter = ',')]
        columns: Option<Vec<String>>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RelaysCmd {
    /// List the cluster's relays from the shared store: Id, State (active, draining,
    /// silent), Version, Agents and Streams (each relay asked for its own), Heartbeat
    /// age, agent URL and admin URL.
    List {
        /// Comma-separated columns to show.
        #[arg(long, value_delimiter = ',')]
        columns: Option<Vec<String>>,
    },
    /// Drain relay ID for an upgrade: it leaves the set agents hold sessions to (they
    /// move their new streams to the other relays), closes its ports, lets its streams
    /// finish up to its --drain-timeout and exits 0. Any relay of the cluster takes the
    /// request. Same as SIGTERM to that relay.
    Drain {
        /// The relay's id (`sluice relays list`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// List registration JWTs: Id (the JWT's jti), Customer, Resource, Created, Expires,
    /// Agents (how many enrolled with it), Revoked.
    List {
        /// Only the JWTs of this customer.
        #[arg(long)]
        customer_id: Option<String>,
        /// Comma-separated columns to show: Id,Customer,CustomerId,Resource,Created,Expires,Agents,Revoked.
        #[arg(long, value_delimiter = ',')]
        columns: Option<Vec<String>>,
    },
    /// Revoke one registration JWT: no agent can enroll with it any more. Agents that
    /// already enrolled with it stay connected (their certificate is their identity);
    /// rotate their resource to cut them off.
    Revoke {
        /// The JWT's id (jti), as `sluice tokens list` shows it.
        jti: String,
        /// Exit 0 (with a note on stderr) when there is no such JWT.
        #[arg(long)]
        ignore_not_found: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiTokensCmd {
    /// Create an API token and print it (only the token, on stdout; shown this once,
    /// the relay keeps only its SHA-256): `export SLUICE_ADMIN_TOKEN=$(sluice api-tokens
    /// create --role platform --name ci)`.
    Create {
        /// admin (everything), operator (read everything, rotate, revoke registration
        /// JWTs, drain relays), platform (read resources and endpoints, manage leases),
        /// customer (one customer's resources, JWTs and agents; needs --customer-id).
        #[arg(long, value_enum)]
        role: crate::admin::auth::Role,
        /// With --role customer: the customer the token is confined to.
        #[arg(long)]
        customer_id: Option<String>,
        /// Make the token expire after this long (e.g. 12h, 30d). Default: never.
        #[arg(long, value_parser = parse_duration_secs)]
        expires_in: Option<u64>,
        /// What the token is for (shown in lists), e.g. "ci-runner".
        #[arg(long)]
        name: Option<String>,
    },
    /// List API tokens: Id, Name, Role, Customer, Created, Expires, Revoked (never the tokens).
    List {
        /// Comma-separated columns to show.
        #[arg(long, value_delimiter = ',')]
        columns: Option<Vec<String>>,
    },
    /// Revoke an API token: every relay sharing the store refuses it from its next request.
    Revoke {
        /// The token's id (tok_…), as `sluice api-tokens list` shows it.
        id: String,
        /// Exit 0 (with a note on stderr) when there is no such token.
        #[arg(long)]
        ignore_not_found: bool,
    },
}

/// Options of `sluice audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only records from this long ago on (e.g. 1h, 7d). Default: all kept.
    #[arg(long, value_parser = parse_duration_secs)]
    pub since: Option<u64>,
    /// Only records of this resource (name or id; admin actions whose target is this id).
    #[arg(long)]
    pub resource: Option<String>,
    /// At most this many (the newest).
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
}

/// Options of `sluice streams`.
#[derive(Debug, Args)]
pub struct StreamsArgs {
    /// Only streams of this resource (name or id).
    #[arg(long)]
    pub resource: Option<String>,
    /// Ask again every second until Ctrl-C: on a terminal the table is redrawn in place
    /// (like top); piped, tables follow one another separated by a blank line, and with
    /// `--output json` each refresh is one JSON line `{"at_ms": …, "streams": [...]}`.
    /// No screen-control code is written when stdout is not a terminal.
    #[arg(long)]
    pub watch: bool,
    /// Show the recently closed streams (last 1,000) with their final counts instead.
    #[arg(long, conflicts_with = "watch")]
    pub closed: bool,
}

/// Parses a registration JWT lifetime into seconds: a duration such as `90s`, `30m`,
/// `24h`, `7d` or `1h 30m` (the `humantime` grammar), or a bare number of seconds as
/// earlier versions took. Zero, and more than 100 years, are refused.
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let secs = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>().map_err(|_| format!("{s:?} seconds is far more than 100 years; give e.g. 7d"))?
    } else {
        humantime::parse_duration(s)
            .map_err(|e| match e {
                humantime::DurationError::NumberOverflow => {
                    format!("{s:?} is far more than 100 years; give e.g. 7d")
                }
                e => format!(
                    "{s:?} is not a duration ({e}): use e.g. 90s, 30m, 24h, 7d or \"1h 30m\", or a number of seconds"
                ),
            })?
            .as_secs()
    };
    crate::admin::ops::check_jwt_lifetime(secs)
}

/// A connection to a relay's admin API.
pub struct AdminClient {
    base: String,
    token: String,
    http: crate::cli_tls::AdminHttp,
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

impl AdminClient {
    pub fn new(conn: &AdminConn) -> Result<Self> {
        let base = conn.admin_url.clone().or_else(|| read_trimmed(&conn.data_dir.join(files::ADMIN_URL))).ok_or_else(
            || {
                anyhow!(
                    "cannot find the relay: pass --admin-url (SLUICE_ADMIN_URL), or run on the relay's host with \
                     --data-dir pointing at its data directory (looked in {})",
                    conn.data_dir.display()
                )
            },
        )?;
        let token =
            conn.admin_token.clone().or_else(|| read_trimmed(&conn.data_dir.join(files::ADMIN_TOKEN))).ok_or_else(
                || {
                    anyhow!(
                        "no admin token: pass --admin-token (SLUICE_ADMIN_TOKEN), or run on the relay's host with \
                     --data-dir pointing at its data directory (looked in {})",
                        conn.data_dir.display()
                    )
                },
            )?;
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!(
                "--admin-url {base:?} must start with http:// or https:// (https: the relay runs with --admin-tls or \
                 sits behind a TLS reverse proxy)"
            );
        }
        Ok(AdminClient { base: base.trim_end_matches('/').to_owned(), token, http: crate::cli_tls::admin_http(conn)? })
    }

    /// The same client (token) for another relay's admin API.
    pub fn for_relay(&self, admin_url: &str) -> AdminClient {
        AdminClient {
            base: admin_url.trim_end_matches('/').to_owned(),
            token: self.token.clone(),
            http: self.http.clone(),
        }
    }

    /// Sends a request; a non-2xx answer becomes an error with the API's message.
    pub async fn call<T: DeserializeOwned>(&self, method: &str, path: &str, body: Option<Value>) -> Result<T> {
        let url = format!("{}{}", self.base, path);
        let req = hyper::Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| anyhow!("{}", crate::cli_tls::describe_failure(&e, &self.base)))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let msg = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ApiError { status: status.as_u16(), message: format!("{msg} ({status})") }.into());
        }
        if bytes.is_empty() {
            return Ok(serde_json::from_value(Value::Null)?);
        }
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected answer from {url}"))
    }
}

/// A non-2xx answer of the admin API: its status and message (the error the CLI shows).
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// With `--ignore-not-found`, turns the API's 404 for `what` into `Ok(None)` after a note
/// on stderr, so that a script deleting something already gone goes on; any other error
/// (and any 404 without the flag) stays an error.
fn unless_not_found<T>(result: Result<T>, ignore_not_found: bool, what: &str) -> Result<Option<T>> {
    match result {
        Err(e) if ignore_not_found && e.downcast_ref::<ApiError>().is_some_and(|a| a.status == 404) => {
            eprintln!("note: {what} does not exist (--ignore-not-found): nothing to do. The relay said: {e}");
            Ok(None)
        }
        r => r.map(Some),
    }
}

/// Runs `sluice customers …`.
pub async fn customers(conn: &AdminConn, cmd: CustomersCmd) -> Result<()> {
    let api = AdminClient::new(conn)?;
    match cmd {
        CustomersCmd::Create { name } => {
            let c: Customer = api.call("POST", "/v1/customers", Some(serde_json::json!({ "name": name }))).await?;
            match conn.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&c)?),
                Output::Table => println!("{}", c.id),
            }
        }
        CustomersCmd::List { columns } => {
            let list: Vec<Customer> = api.call("GET", "/v1/customers", None).await?;
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let rows = list.iter().map(|c| vec![c.id.clone(), c.name.clone(), ago(Some(c.created_at))]).collect();
            print_table(&["Id", "Name", "Created"], &["Id", "Name"], rows, columns.as_deref())?;
        }
    }
    Ok(())
}

/// Runs `sluice resources …`.
pub async fn resources(conn: &AdminConn, cmd: ResourcesCmd) -> Result<()> {
    let api = AdminClient::new(conn)?;
    match cmd {
        ResourcesCmd::RegistrationJwt { customer_id, org_only, resource_id, rotate, expires_in } => {
            let req = JwtRequest { customer_id, org_only, resource_id, rotate, expires_in_secs: expires_in };
            let issued: JwtIssued =
                api.call("POST", "/v1/registration-jwts", Some(serde_json::to_value(&req)?)).await?;
            if rotate {
                eprint!("{}", rotation_report(&issued));
            }
            match conn.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&issued)?),
                Output::Table => println!("{}", issued.jwt),
            }
        }
        ResourcesCmd::List { extended, columns } => {
            let mut list: Vec<ResourceView> = api.call("GET", "/v1/resources", None).await?;
            let relays = agents_by_relay(&api, &mut list).await;
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let all = [
                "Name",
                "Status",
                "Customer",
                "Id",
                "CustomerId",
                "Endpoint",
                "Agents",
                "Last seen",
                "Service error",
                "Port error",
                "Per relay",
            ];
            let cluster_default = ["Name", "Status", "Customer", "Per relay"];
            let default: &[&str] = match (extended, relays.len() > 1) {
                (true, true) => &all,
                (true, false) => &all[..10],
                (false, true) => &cluster_default,
                (false, false) => &all[..3],
            };
            let rows = list
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        serde_json::to_value(r.status)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        r.customer_name.clone().unwrap_or_else(|| "-".into()),
                        r.id.clone(),
                        r.customer_id.clone().unwrap_or_else(|| "-".into()),
                        r.endpoint.clone(),
                        r.agents.to_string(),
                        if r.agents > 0 { "now".into() } else { ago(r.last_seen_at) },
                        r.service_error.clone().unwrap_or_else(|| "-".into()),
                        r.port_error.clone().unwrap_or_else(|| "-".into()),
                        per_relay(r, &relays),
                    ]
                })
                .collect();
            print_table(&all, default, rows, columns.as_deref())?;
            if relays.len() > 1 {
                println!("Per relay: agent sessions on {}", relays.join(" / "));
            }
        }
        ResourcesCmd::Endpoint { name_or_id, customer_id } => {
            let mut path = format!("/v1/resources/{}", encode_path(&name_or_id));
            if let Some(c) = &customer_id {
                path.push_str(&format!("?customer_id={}", encode_path(c)));
            }
            let r: ResourceView = api.call("GET", &path, None).await?;
            match conn.output {
                Output::Json => println!("{}", serde_json::json!({ "id": r.id, "endpoint": r.endpoint })),
                Output::Table => println!("{}", r.endpoint),
            }
        }
        ResourcesCmd::Delete { name_or_id, customer_id, ignore_not_found } => {
            let mut path = format!("/v1/resources/{}", encode_path(&name_or_id));
            if let Some(c) = &customer_id {
                path.push_str(&format!("?customer_id={}", encode_path(c)));
            }
            let what = format!("resource {name_or_id:?}");
            if unless_not_found(api.call::<Value>("DELETE", &path, None).await, ignore_not_found, &what)?.is_some() {
                eprintln!("Deleted resource {name_or_id}.");
            }
        }
        ResourcesCmd::Update { name_or_id, access } => {
            let r: ResourceView = api
                .call(
                    "PATCH",
                    &format!("/v1/resources/{}", encode_path(&name_or_id)),
                    Some(serde_json::json!({ "access": access })),
                )
                .await?;
            match conn.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                Output::Table if r.access == "leased" => eprintln!(
                    "Resource {} ({}) is leased-only: its port {} refuses every connection; platform jobs connect \
                     through leases (`sluice leases create {}`).",
                    r.name, r.id, r.endpoint, r.id
                ),
                Output::Table => eprintln!(
                    "Resource {} ({}) is open: its port {} admits every connection.",
                    r.name, r.id, r.endpoint
                ),
            }
        }
    }
    Ok(())
}

/// Runs `sluice leases …`.
pub async fn leases(conn: &AdminConn, cmd: LeasesCmd) -> Result<()> {
    let api = AdminClient::new(conn)?;
    let all = ["Id", "Resource", "Endpoint", "State", "Expires", "Connections", "Source", "Ended", "Open"];
    let default = ["Id", "Resource", "Endpoint", "State", "Expires", "Connections", "Source"];
    let row = |l: &LeaseView| {
        vec![
            l.id.clone(),
            l.resource_id.clone(),
            l.endpoint.clone(),
            l.state.clone(),
            expires(Some(l.expires_at)),
            match l.max_connections {
                Some(m) => format!("{}/{m}", l.connections_used),
                None => l.connections_used.to_string(),
            },
            l.source.clone().unwrap_or_else(|| "any".into()),
            match (&l.ended_at, &l.end_reason) {
                (Some(t), Some(why)) => format!("{} ({why})", ago(Some(*t))),
                (Some(t), None) => ago(Some(*t)),
                _ => "-".into(),
            },
            l.open_streams.to_string(),
        ]
    };
    match cmd {
        LeasesCmd::Create { resource, ttl, max_connections, source } => {
            let req = LeaseRequest { ttl_secs: ttl, max_connections, source };
            let lease: LeaseView = api
                .call(
                    "POST",
                    &format!("/v1/resources/{}/leases", encode_path(&resource)),
                    Some(serde_json::to_value(&req)?),
                )
                .await?;
            match conn.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&lease)?),
                Output::Table => print_table(&all, &default, vec![row(&lease)], None)?,
            }
        }
        LeasesCmd::List { resource, columns } => {
            let mut path = "/v1/leases".to_owned();
            if let Some(r) = &resource {
                path.push_str(&format!("?resource={}", encode_path(r)));
            }
            let list: Vec<LeaseView> = api.call("GET", &path, None).await?;
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            print_table(&all, &default, list.iter().map(row).collect(), columns.as_deref())?;
        }
        LeasesCmd::Delete { id, ignore_not_found } => {
            let deleted = api.call("DELETE", &format!("/v1/leases/{}", encode_path(&id)), None).await;
            let Some(lease): Option<LeaseView> = unless_not_found(deleted, ignore_not_found, &format!("lease {id:?}"))?
            else {
                return Ok(());
            };
            match conn.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&lease)?),
                Output::Table => eprintln!(
                    "Ended lease {}: its port {} refuses new connections; open streams are cut after the relay's \
                     --lease-grace.",
                    lease.id, lease.endpoint
                ),
            }
        }
    }
    Ok(())
}

/// Runs `sluice agents …`.
pub async fn agents(conn: &AdminConn, cmd: AgentsCmd) -> Result<()> {
    let api = AdminClient::new(conn)?;
    let AgentsCmd::List { resource, columns } = cmd;
    let mut path = "/v1/agents".to_owned();
    if let Some(r) = &resource {
        path.push_str(&format!("?resource={}", encode_path(r)));
    }
    let list: Vec<AgentView> = api.call("GET", &path, None).await?;
    for a in list.iter().filter(|a| !a.shared_identity_with.is_empty()) {
        eprintln!(
            "warning: agent {} has {} live sessions ({} and {}): its STATE_DIR was probably copied to a second host \
             or container; give each agent its own STATE_DIR so each has its own identity",
            a.agent_id,
            a.shared_identity_with.len() + 1,
            a.session_id,
            a.shared_identity_with.join(", ")
        );
    }
    if conn.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let all = [
        "Id",
        "Resource",
        "Host",
        "Version",
        "Peer",
        "Connected",
        "Path",
        "Counter",
        "Service",
        "Last error",
        "Session",
    ];
    let rows = list
        .iter()
        .map(|a| {
            vec![
                a.agent_id.to_string(),
                a.resource_name.clone(),
                a.hostname.clone(),
                a.agent_version.clone(),
                a.peer.clone(),
                ago(Some(a.connected_at)),
                a.data_path.clone(),
                a.counter.clone(),
                a.service.clone(),
                a.last_error.clone().unwrap_or_else(|| "-".into()),
                a.session_id.to_string(),
            ]
        })
        .collect();
    print_table(&all, &all[..10], rows, columns.as_deref())
}

/// In a cluster, asks every relay for its agent sessions per resource and fills
/// `agents_by_relay`; returns the relay ids in `relays list` order (empty for a single
/// relay or an older one).
async fn agents_by_relay(api: &AdminClient, list: &mut [ResourceView]) -> Vec<String> {
    use crate::admin::relays::{RelaySelf, RelayView};
    let Ok(relays) = api.call::<Vec<RelayView>>("GET", "/v1/relays", None).await else { return Vec::new() };
    let relays: Vec<RelayView> = relays.into_iter().filter(|r| r.state != "silent").collect();
    if relays.len() < 2 {
        return Vec::new();
    }
    let me = api.call::<RelaySelf>("GET", "/v1/relays/self", None).await.ok().map(|m| m.id);
    let mut asks = tokio::task::JoinSet::new();
    for r in relays.iter().filter(|r| Some(&r.id) != me.as_ref()) {
        let (other, id) = (api.for_relay(&r.admin_url), r.id.clone());
        asks.spawn(async move {
            let ask = other.call::<Vec<ResourceView>>("GET", "/v1/resources", None);
            (id, tokio::time::timeout(std::time::Duration::from_secs(2), ask).await.ok().and_then(Result::ok))
        });
    }
    let mut answers: Vec<(String, Vec<ResourceView>)> = Vec::new();
    while let Some(answer) = asks.join_next().await {
        if let Ok((id, Some(views))) = answer {
            answers.push((id, views));
        }
    }
    for r in list.iter_mut() {
        let mut by = std::collections::BTreeMap::new();
        if let Some(me) = &me {
            by.insert(me.clone(), r.agents);
        }
        for (id, views) in &answers {
            by.insert(id.clone(), views.iter().find(|v| v.id == r.id).map_or(0, |v| v.agents));
        }
        r.agents_by_relay = Some(by);
    }
    relays.into_iter().map(|r| r.id).collect()
}

/// `2/2/0`: a resource's agent sessions on each relay, in `relays` order (`?`: that
/// relay did not answer).
fn per_relay(r: &ResourceView, relays: &[String]) -> String {
    let Some(by) = &r.agents_by_relay else { return "-".into() };
    relays.iter().map(|id| by.get(id).map_or_else(|| "?".to_owned(), |n| n.to_string())).collect::<Vec<_>>().join("/")
}

/// Runs `sluice relays …`.
pub async fn relays(conn: &AdminConn, cmd: RelaysCmd) -> Result<()> {
    use crate::admin::relays::{RelaySelf, RelayView};
    let api = AdminClient::new(conn)?;
    match cmd {
        RelaysCmd::Drain { id } => {
            let r: RelayView = api.call("POST", &format!("/v1/relays/{}/drain", encode_path(&id)), None).await?;
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "relay {} is draining: it leaves the agents' set within seconds, lets its streams finish (up to                      its --drain-timeout) and exits 0; `sluice relays list` shows it until then",
                    r.id
                );
            }
            Ok(())
        }
        RelaysCmd::List { columns } => {
            let mut list: Vec<RelayView> = api.call("GET", "/v1/relays", None).await?;
            // Each relay knows its own sessions and streams: ask the others (briefly).
            let mut asks = tokio::task::JoinSet::new();
            for r in list.iter().filter(|r| r.agents.is_none()) {
                let other = api.for_relay(&r.admin_url);
                asks.spawn(async move {
                    let ask = other.call::<RelaySelf>("GET", "/v1/relays/self", None);
                    tokio::time::timeout(std::time::Duration::from_secs(2), ask).await.ok().and_then(Result::ok)
                });
            }
            while let Some(answer) = asks.join_next().await {
                if let Ok(Some(me)) = answer
                    && let Some(r) = list.iter_mut().find(|r| r.id == me.id)
                {
                    r.agents = Some(me.agents);
                    r.streams = Some(me.streams);
                }
            }
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let all = ["Id", "State", "Version", "Agents", "Streams", "Heartbeat", "Agent URL", "Admin URL", "Started"];
            let unknown = || "?".to_owned();
            let rows = list
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        r.state.clone(),
                        r.version.clone(),
                        r.agents.map_or_else(unknown, |n| n.to_string()),
                        r.streams.map_or_else(unknown, |n| n.to_string()),
                        format!("{}s ago", r.heartbeat_age_secs),
                        r.agent_url.clone(),
                        r.admin_url.clone(),
                        ago(Some(r.started_at)),
                    ]
                })
                .collect();
            print_table(&all, &all[..8], rows, columns.as_deref())?;
            let total: usize = list.iter().filter_map(|r| r.streams).sum();
            let agents: usize = list.iter().filter_map(|r| r.agents).sum();
            if list.len() > 1 {
                println!("{} relays; {agents} agent sessions and {total} streams in all", list.len());
            }
            if list.iter().any(|r| r.agents.is_none()) {
                eprintln!("note: `?`: that relay's admin API did not answer from here (its admin URL is shown)");
            }
            Ok(())
        }
    }
}

/// Runs `sluice tokens …`.
pub async fn tokens(conn: &AdminConn, cmd: TokensCmd) -> Result<()> {
    let api = AdminClient::new(conn)?;
    match cmd {
        TokensCmd::List { customer_id, columns } => {
            let mut path = "/v1/registration-jwts".to_owned();
            if let Some(c) = &customer_id {
                path.push_str(&format!("?customer_id={}", encode_path(c)));
            }
            let list: Vec<RegistrationJwtView> = api.call("GET", &path, None).await?;
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let all = ["Id", "Customer", "CustomerId", "Resource", "Created", "Expires", "Agents", "Revoked"];
            let default = ["Id", "Customer", "Resource", "Created", "Expires", "Agents", "Revoked"];
            let rows = list
                .iter()
                .map(|t| {
                    vec![
                        t.jti.clone(),
                        t.customer_name.clone().or_else(|| t.customer_id.clone()).unwrap_or_else(|| "-".into()),
                        t.customer_id.clone().unwrap_or_else(|| "-".into()),
                        t.resource_id.clone().unwrap_or_else(|| "-".into()),
                        ago(Some(t.issued_at)),
                        expires(t.expires_at),
                        t.agents.to_string(),
                        t.revoked_at.map_or_else(|| "-".into(), |r| ago(Some(r))),
                    ]
                })
                .collect();
            print_table(&all, &default, rows, columns.as_deref())?;
        }
        TokensCmd::Revoke { jti, ignore_not_found } => {
            let revoked = api.call("POST", &format!("/v1/registration-jwts/{}/revoke", encode_path(&jti)), None).await;
            let what = format!("registration JWT {jti:?}");
            let Some(done): Option<JwtRevoked> = unless_not_found(revoked, ignore_not_found, &what)? else {
                return Ok(());
            };
            match conn.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&done)?),
                Output::Table => eprint!("{}", revocation_report(&done)),
            }
        }
    }
    Ok(())
}

/// Runs `sluice api-tokens …`.
pub async fn api_tokens(conn: &AdminConn, cmd: ApiTokensCmd) -> Result<()> {
    use crate::admin::api_tokens::{ApiTokenCreated, ApiTokenRequest};
    use crate::state::store::ApiTokenRecord;
    let api = AdminClient::new(conn)?;
    match cmd {
        ApiTokensCmd::Create { role, customer_id, expires_in, name } => {
            let req = ApiTokenRequest { role, customer_id, expires_in_secs: expires_in, name };
            let created: ApiTokenCreated =
                api.call("POST", "/v1/api-tokens", Some(serde_json::to_value(&req)?)).await?;
            match conn.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&created)?),
                Output::Table => {
                    eprintln!(
                        "Created API token {} (role {}{}, expires {}). It is shown this once: the relay keeps only \
                         its hash. Revoke it with `sluice api-tokens revoke {}`.",
                        created.record.id,
                        created.record.role,
                        created.record.customer_id.as_deref().map(|c| format!(" for customer {c}")).unwrap_or_default(),
                        expires(created.record.expires_at),
                        created.record.id
                    );
                    println!("{}", created.token);
                }
            }
        }
        ApiTokensCmd::List { columns } => {
            let list: Vec<ApiTokenRecord> = api.call("GET", "/v1/api-tokens", None).await?;
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let all = ["Id", "Name", "Role", "Customer", "Created", "Expires", "Revoked"];
            let dash = || "-".to_owned();
            let rows = list
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.name.clone().unwrap_or_else(dash),
                        t.role.clone(),
                        t.customer_id.clone().unwrap_or_else(dash),
                        ago(Some(t.created_at)),
                        expires(t.expires_at),
                        t.revoked_at.map_or_else(dash, |r| ago(Some(r))),
                    ]
                })
                .collect();
            print_table(&all, &all, rows, columns.as_deref())?;
        }
        ApiTokensCmd::Revoke { id, ignore_not_found } => {
            let revoked = api.call("POST", &format!("/v1/api-tokens/{}/revoke", encode_path(&id)), None).await;
            let Some(t): Option<ApiTokenRecord> =
                unless_not_found(revoked, ignore_not_found, &format!("API token {id:?}"))?
            else {
                return Ok(());
            };
            match conn.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&t)?),
                Output::Table => eprintln!(
                    "API token {} is revoked ({}): every relay sharing the store refuses it from its next request.",
                    t.id,
                    ago(t.revoked_at)
                ),
            }
        }
    }
    Ok(())
}

/// Runs `sluice audit`.
pub async fn audit(conn: &AdminConn, args: AuditArgs) -> Result<()> {
    use crate::state::store::{AuditEvent, AuditRecord};
    let api = AdminClient::new(conn)?;
    let since_ms = args.since.map_or(0, |s| crate::audit::now_ms().saturating_sub(s.saturating_mul(1000)));
    let mut path = format!("/v1/audit?since={since_ms}&limit={}", args.limit);
    if let Some(r) = &args.resource {
        path.push_str(&format!("&resource={}", encode_path(r)));
    }
    let list: Vec<AuditRecord> = api.call("GET", &path, None).await?;
    if conn.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let all = ["Time", "Kind", "Who", "Action", "Target", "Result", "From", "In", "Out", "Relay", "Id"];
    let rows = list
        .iter()
        .map(|r| {
            let time =
                humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.at_ms))
                    .to_string();
            match &r.event {
                AuditEvent::Admin(a) => vec![
                    time,
                    "admin".into(),
                    format!("{} ({})", a.token_id, a.role),
                    a.action.clone(),
                    a.target.clone().unwrap_or_else(|| "-".into()),
                    // The status only: the error's full text is in --output json.
                    a.status.to_string(),
                    a.source.clone(),
                    "-".into(),
                    "-".into(),
                    r.relay_id.clone(),
                    r.id.clone(),
                ],
                AuditEvent::Stream(s) => vec![
                    time,
                    "stream".into(),
                    s.agent_id.clone(),
                    format!("stream {:.1}s", s.ended_at_ms.saturating_sub(s.started_at_ms) as f64 / 1000.0),
                    s.resource_name.clone(),
                    s.end_detail.clone(),
                    s.client_addr.clone(),
                    s.bytes_in.to_string(),
                    s.bytes_out.to_string(),
                    r.relay_id.clone(),
                    r.id.clone(),
                ],
            }
        })
        .collect();
    print_table(&all, &all[..9], rows, None)?;
    Ok(())
}

/// What revoking a JWT did and did not do, for the operator.
fn revocation_report(done: &JwtRevoked) -> String {
    let jti = &done.jti;
    let mut out = if done.newly_revoked {
        format!("Revoked registration JWT {jti}: no agent can enroll with it any more.\n")
    } else {
        format!("Registration JWT {jti} was already revoked ({}); nothing changed.\n", ago(Some(done.revoked_at)))
    };
    if done.agent_resource_ids.is_empty() {
        out.push_str("No agent on record enrolled with it.\n");
    } else {
        out.push_str(&format!(
            "Agents that enrolled with it (resources {}) stay connected: revoking a JWT does not disconnect them, \
             their certificate is their identity, renewed over their session without a JWT. They would enroll again \
             with this JWT, and be refused, only if their state directory is lost or their certificate expires \
             while they are offline: give them a new JWT for that case. To cut them off now, rotate their \
             resource:\n",
            done.agent_resource_ids.join(", ")
        ));
        for rid in &done.agent_resource_ids {
            out.push_str(&format!("  sluice resources registration-jwt --resource-id {rid} --rotate\n"));
        }
    }
    out
}

/// "in 6d" / "expired 5m ago" / "never".
fn expires(t: Option<u64>) -> String {
    let Some(t) = t else { return "never".into() };
    let now = sluice_proto::identity::unix_now();
    if t <= now {
        return format!("expired {}", ago(Some(t)));
    }
    let d = t - now;
    match d {
        0..=59 => format!("in {d}s"),
        60..=3599 => format!("in {}m", d / 60),
        3600..=86399 => format!("in {}h", d / 3600),
        _ => format!("in {}d", d / 86400),
    }
}

/// What a rotation revoked, for the operator (stderr: stdout holds only the new JWT).
fn rotation_report(issued: &JwtIssued) -> String {
    let rid = issued.resource_id.as_deref().unwrap_or("?");
    let list = |jtis: &[String]| if jtis.is_empty() { "none".to_owned() } else { jtis.join(", ") };
    format!(
        "Rotated resource {rid} to key generation {}: its agents' older certificates are revoked; {} agent(s) \
         disconnected.\n\
         Revoked {} registration JWT(s) issued for {rid}: {}.\n\
         {} customer JWT(s) that enrolled agents of {rid} can no longer enroll agents for {rid} (they stay valid for \
         other resources): {}.\n",
        issued.generation.unwrap_or(0),
        issued.disconnected_agents,
        issued.revoked_resource_jwts.len(),
        list(&issued.revoked_resource_jwts),
        issued.blocked_for_resource_jwts.len(),
        list(&issued.blocked_for_resource_jwts),
    )
}

/// Runs `sluice streams`.
///
/// With `--watch` it asks again every second until Ctrl-C. On a terminal the table is
/// redrawn in place; piped (stdout not a terminal) no screen-control code is ever
/// written: tables follow one another separated by a blank line, and `--output json`
/// prints one JSON line per refresh (see [`WatchSnapshot`]). A reader that goes away
/// (`| head -1`) ends the watch quietly.
pub async fn streams(conn: &AdminConn, args: StreamsArgs) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let api = AdminClient::new(conn)?;
    let mut path = format!("/v1/streams?closed={}", args.closed);
    if let Some(r) = &args.resource {
        path.push_str(&format!("&resource={}", encode_path(r)));
    }
    let redraw_in_place = args.watch && std::io::stdout().is_terminal();
    let width = stdout_terminal_width();
    let mut first = true;
    loop {
        let list: Vec<StreamView> = api.call("GET", &path, None).await?;
        let at_ms = crate::audit::now_ms();
        let page = streams_page(&list, conn.output, args.watch, redraw_in_place, first, at_ms, width)?;
        first = false;
        let mut out = std::io::stdout().lock();
        match out.write_all(page.as_bytes()).and_then(|()| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            r => r.context("cannot write to stdout")?,
        }
        drop(out);
        if !args.watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// One line of `sluice streams --watch --output json`: the streams open (or recently
/// closed, with `--closed`) at one refresh. One object per refresh, one per line, so a
/// script reads snapshots with any JSON-lines reader.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct WatchSnapshot {
    /// When the relay was asked, in ms since the Unix epoch.
    pub at_ms: u64,
    pub streams: Vec<StreamView>,
}

/// What one refresh of `sluice streams` prints. `redraw_in_place` (watching on a
/// terminal) homes the cursor and clears the screen first; otherwise successive tables
/// are separated by a blank line and no escape sequence is written.
fn streams_page(
    list: &[StreamView],
    output: Output,
    watch: bool,
    redraw_in_place: bool,
    first: bool,
    at_ms: u64,
    width: Option<u16>,
) -> Result<String> {
    let mut page = String::new();
    if output == Output::Json {
        if watch {
            let snapshot = WatchSnapshot { at_ms, streams: list.to_vec() };
            page.push_str(&serde_json::to_string(&snapshot)?);
        } else {
            page.push_str(&serde_json::to_string_pretty(list)?);
        }
        page.push('\n');
        return Ok(page);
    }
    if redraw_in_place {
        page.push_str("\x1b[H\x1b[2J");
    } else if watch && !first {
        page.push('\n');
    }
    let all = ["Resource", "Agent", "Stream", "Client", "Age", "In", "Out", "Rate in", "Rate out", "Path", "Counter"];
    let rows = list
        .iter()
        .map(|s| {
            vec![
                s.resource_name.clone(),
                s.agent_id.clone(),
                s.stream_id.to_string(),
                s.client_addr.clone(),
                format_age(s.age_secs),
                format_bytes(s.bytes_in as f64),
                format_bytes(s.bytes_out as f64),
                format!("{}/s", format_bytes(s.rate_in_bps)),
                format!("{}/s", format_bytes(s.rate_out_bps)),
                s.path.as_str().to_owned(),
                s.counter.clone(),
            ]
        })
        .collect();
    if watch {
        let time = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms));
        let stop = if redraw_in_place { "; Ctrl-C to stop" } else { "" };
        page.push_str(&format!("sluice streams — {} open at {time} (In: client → service{stop})\n\n", list.len()));
    }
    page.push_str(&render_table_within(&all, &all, rows, None, width)?);
    Ok(page)
}

/// `1.5 MiB` style sizes.
pub fn format_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{v:.0} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

fn format_age(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn encode_path(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// "5m ago" style rendering of a Unix time.
fn ago(t: Option<u64>) -> String {
    let Some(t) = t else { return "never".into() };
    let d = sluice_proto::identity::unix_now().saturating_sub(t);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

/// Prints rows as an aligned table. `wanted` (case-insensitive names) overrides `default`.
/// On a terminal the table is fitted to its width (see [`render_table_within`]); piped
/// into a script it is printed whole.
fn print_table(all: &[&str], default: &[&str], rows: Vec<Vec<String>>, wanted: Option<&[String]>) -> Result<()> {
    print!("{}", render_table_within(all, default, rows, wanted, stdout_terminal_width())?);
    Ok(())
}

/// The width of the terminal stdout is, or `None` when stdout is not a terminal (a pipe,
/// a file: scripts get whole lines, never wrapped).
pub fn stdout_terminal_width() -> Option<u16> {
    use std::io::IsTerminal;
    let out = std::io::stdout();
    if !out.is_terminal() {
        return None;
    }
    terminal_size::terminal_size_of(&out).map(|(terminal_size::Width(w), _)| w)
}

/// Columns of free text (names, host names, error messages): the ones wrapped when a
/// table is wider than the terminal. Ids, endpoints, times and counts are never wrapped,
/// so they can still be copied whole from the screen.
const FREE_TEXT_COLUMNS: &[&str] =
    &["Name", "Customer", "Host", "Service error", "Port error", "Last error", "Action", "Target", "Result", "Ended"];

/// The table [`print_table`] prints, unfitted (as for a pipe).
#[cfg(test)]
fn render_table(all: &[&str], default: &[&str], rows: Vec<Vec<String>>, wanted: Option<&[String]>) -> Result<String> {
    render_table_within(all, default, rows, wanted, None)
}

/// Renders rows as a table without borders: columns left-aligned by display width (so
/// "Zürich Straßenbahn AG" or a CJK name lines up), two spaces apart, no trailing
/// blanks. With `width` (a terminal's), the free-text columns ([`FREE_TEXT_COLUMNS`])
/// wrap so that the table fits; without it lines are never wrapped.
///
/// Cells come from the store and from agents (names, host names, service errors):
/// control characters in them are escaped, so no cell can break the table's lines or
/// send escape sequences to the operator's terminal.
fn render_table_within(
    all: &[&str],
    default: &[&str],
    rows: Vec<Vec<String>>,
    wanted: Option<&[String]>,
    width: Option<u16>,
) -> Result<String> {
    use comfy_table::{ColumnConstraint, ContentArrangement, Table, TableStyle};
    let rows: Vec<Vec<String>> =
        rows.into_iter().map(|r| r.iter().map(|c| sluice_proto::identity::escape_controls(c)).collect()).collect();
    let pick: Vec<usize> = match wanted {
        Some(w) => w
            .iter()
            .map(|c| {
                all.iter()
                    .position(|a| a.eq_ignore_ascii_case(c.trim()) || a.replace(' ', "").eq_ignore_ascii_case(c.trim()))
                    .ok_or_else(|| anyhow!("unknown column {c:?}; available: {}", all.join(",")))
            })
            .collect::<Result<_>>()?,
        None => default.iter().map(|d| all.iter().position(|a| a == d).expect("default column exists")).collect(),
    };
    let mut table = Table::new();
    table.load_style(TableStyle::new());
    table.set_header(pick.iter().map(|&i| all[i]).collect::<Vec<_>>());
    for row in &rows {
        table.add_row(pick.iter().map(|&i| row[i].as_str()).collect::<Vec<_>>());
    }
    let last = pick.len().saturating_sub(1);
    for (n, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if n == last { 0 } else { 2 }));
        if width.is_some() && !FREE_TEXT_COLUMNS.contains(&all[pick[n]]) {
            column.set_constraint(ColumnConstraint::ContentWidth);
        }
    }
    match width {
        Some(w) => table.set_content_arrangement(ContentArrangement::Dynamic).set_width(w),
        None => table.set_content_arrangement(ContentArrangement::Disabled),
    };
    let mut out = table.trim_fmt();
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_cells_cannot_forge_lines_or_steer_the_terminal() {
        let rows = vec![vec!["db\nFAKE  ROW".to_owned(), "host\u{1b}[31mred".to_owned()]];
        let out = render_table(&["Name", "Host"], &["Name", "Host"], rows, None).unwrap();
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(!out.contains('\u{1b}'), "{out:?}");
        assert!(out.contains("db\\u{a}FAKE  ROW"), "{out}");
    }

    #[test]
    fn tables_align_by_display_width() {
        use unicode_width::UnicodeWidthStr;
        let rows = vec![
            vec!["Zürich Straßenbahn AG".to_owned(), "res_1".to_owned()],
            // "ü" as u + combining diaeresis: 2 chars, 1 column.
            vec!["Zu\u{308}rich".to_owned(), "res_2".to_owned()],
            vec!["東京電力".to_owned(), "res_3".to_owned()],
            vec!["Acme".to_owned(), "res_4".to_owned()],
        ];
        let out = render_table(&["Name", "Id"], &["Name", "Id"], rows, None).unwrap();
        let widths: Vec<usize> = out.lines().skip(1).map(UnicodeWidthStr::width).collect();
        assert_eq!(widths.len(), 4, "{out}");
        assert!(widths.iter().all(|w| *w == widths[0]), "lines of unequal display width {widths:?}:\n{out}");
        for line in out.lines() {
            let id_at = UnicodeWidthStr::width(&line[..line.rfind(['r', 'I']).unwrap()]);
            assert_eq!(id_at, UnicodeWidthStr::width("Zürich Straßenbahn AG  "), "{out}");
        }
    }

    #[test]
    fn tables_fit_a_narrow_terminal_without_cutting_ids() {
        use unicode_width::UnicodeWidthStr;
        let error = "connection refused by 10.0.0.7:1433 (is the database up? check APP_HOST and APP_PORT)";
        let rows = vec![vec!["res_0123456789abcdef".to_owned(), "Acme MS SQL".to_owned(), error.to_owned()]];
        let all = ["Id", "Name", "Service error"];
        let out = render_table_within(&all, &all, rows.clone(), None, Some(50)).unwrap();
        assert!(out.lines().all(|l| UnicodeWidthStr::width(l) <= 50), "{out}");
        assert!(out.lines().count() > 2, "the error wraps: {out}");
        assert!(out.contains("res_0123456789abcdef"), "the id is never cut: {out}");
        let words: Vec<&str> = out.lines().flat_map(|l| l.split_whitespace()).collect();
        for word in error.split_whitespace() {
            assert!(words.contains(&word), "{word:?} lost: {out}");
        }
        // Unfitted (stdout piped into a script): one line per row, whatever its length.
        let piped = render_table_within(&all, &all, rows, None, None).unwrap();
        assert_eq!(piped.lines().count(), 2, "{piped}");
        assert!(piped.lines().nth(1).unwrap().ends_with(error), "{piped}");
    }

    #[test]
    fn piped_watch_pages_carry_no_screen_control_codes() {
        let view: StreamView = serde_json::from_value(serde_json::json!({
            "stream_id": 7, "resource_id": "res_1", "resource_name": "Zürich DB", "agent_id": "agt_1",
            "client_addr": "127.0.0.1:5000", "started_at": 1, "age_secs": 3.0, "bytes_in": 10, "bytes_out": 20,
            "rate_in_bps": 1.0, "rate_out_bps": 2.0, "path": "userspace", "counter": "userspace", "closed": false
        }))
        .unwrap();
        let list = vec![view];
        for first in [true, false] {
            let table = streams_page(&list, Output::Table, true, false, first, 1_000, None).unwrap();
            assert!(!table.contains('\x1b'), "{table:?}");
            assert_eq!(table.starts_with('\n'), !first, "a blank line between tables: {table:?}");
            let json = streams_page(&list, Output::Json, true, false, first, 1_000, None).unwrap();
            assert_eq!(json.lines().count(), 1, "{json}");
            let snap: WatchSnapshot = serde_json::from_str(&json).unwrap();
            assert_eq!((snap.at_ms, snap.streams), (1_000, list.clone()));
        }
        let tty = streams_page(&list, Output::Table, true, true, false, 1_000, Some(80)).unwrap();
        assert!(tty.starts_with("\x1b[H\x1b[2J"), "on a terminal the table is redrawn in place: {tty:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("3600"), Ok(3600), "a bare number of seconds still works");
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("30m"), Ok(1800));
        assert_eq!(parse_duration_secs("24h"), Ok(86400));
        assert_eq!(parse_duration_secs("7d"), Ok(604800));
        assert_eq!(parse_duration_secs("1h 30m"), Ok(5400));
        assert_eq!(parse_duration_secs(" 2h30m "), Ok(9000));
        for zero in ["0", "0s", "500ms"] {
            let e = parse_duration_secs(zero).unwrap_err();
            assert!(e.contains("at least 1 second"), "{zero}: {e}");
        }
        for huge in ["99999999999999d", "101y", "3153600001", "99999999999999999999999", "999999999999999999999d"] {
            let e = parse_duration_secs(huge).unwrap_err();
            assert!(e.contains("100 years"), "{huge}: {e}");
        }
        for bad in ["soon", "", "7 days later", "-5m"] {
            let e = parse_duration_secs(bad).unwrap_err();
            assert!(e.contains("is not a duration") && e.contains("30m"), "{bad}: {e}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(format_bytes(0.0), "0 B");
        assert_eq!(format_bytes(1536.0), "1.5 KiB");
        assert_eq!(format_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(format_age(75.0), "1m15s");
    }

    #[test]
    fn path_encoding() {
        assert_eq!(encode_path("res_ab-1"), "res_ab-1");
        assert_eq!(encode_path("a b/c"), "a%20b%2Fc");
    }
}
