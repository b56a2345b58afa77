//! The Sluice agent: runs next to a private service, dials out to the relay (no inbound
//! port), and forwards the streams the relay opens to `APP_HOST:APP_PORT`.
//!
//! [`config`] validates the inputs, [`enroll`] obtains and saves the agent's identity,
//! [`session`] holds one control session and its pool of data connections, [`relays`]
//! one such session to each relay of the cluster, and [`run`] ties them together with
//! reconnection ([`backoff`]) and, when asked to stop, a [`drain`] of the streams under
//! way.

/// This build's version, commit and date (`--version`, logs, `*_build_info`).
pub use sluice_runtime::{BUILD_DATE, GIT_COMMIT, LONG_VERSION, VERSION};

pub(crate) mod backoff;
pub mod config;
pub mod doctor;
pub(crate) mod drain;
pub mod egress;
pub(crate) mod enroll;
pub mod health;
pub(crate) mod meter;
pub(crate) mod metrics;
pub(crate) mod relays;
pub(crate) mod service;
pub(crate) mod session;
pub(crate) mod startup_code;

use sluice_datapath::DataPath;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::enroll::EnrollError;
use crate::session::SessionEnd;

/// This machine's host name, reported to the relay for operators (`unknown` when the
/// kernel does not say).
pub fn hostname() -> String {
    sluice_runtime::hostname().unwrap_or_else(|| "unknown".into())
}

/// Why the agent stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A refusal that retrying cannot fix (bad, revoked or expired JWT; wrong relay).
    #[error("{0}")]
    Fatal(String),
}

/// Runs the agent until `shutdown` fires (Ok) or a permanent failure (Err). When
/// `shutdown` fires it drains: the session ends at once (no new streams), the streams
/// under way get up to `cfg.drain_timeout` to finish, then the rest are cut.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let deadline = cfg.drain_timeout;
    let drain = drain::Drain::default();
    let served = serve(cfg, &shutdown, &drain).await;
    drain.run(if served.is_ok() { deadline } else { Duration::ZERO }).await;
    served
}

/// Keeps a session with the relay up, reconnecting, until `shutdown` or a permanent failure.
async fn serve(cfg: AgentConfig, shutdown: &CancellationToken, drain: &drain::Drain) -> Result<(), AgentError> {
    let shutdown = shutdown.clone();
    let cfg = Arc::new(cfg);
    let (meter, data_path, service) = start_parts(&cfg, &shutdown);
    let parts = session::Parts { cfg: cfg.clone(), meter, data_path, service, drain: drain.clone() };
    let mut backoff = Backoff::new(Duration::from_millis(200), cfg.reconnect_max);
    let wait = |why: &str, backoff: &mut Backoff| {
        let d = backoff.next_delay();
        crate::metrics::relay_unreachable(why);
        warn!(reason = %why, retry_in = ?d, "relay unreachable; will retry");
        d
    };
    // Set when the relay refused the saved identity (or cannot renew it): the next round
    // enrolls with the JWT instead of loading it. The saved files stay until a new
    // identity replaces them, so a refusal of the JWT (say it expired) loses nothing.
    let mut must_enroll: Option<String> = None;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let identity = match identity(&cfg, must_enroll.take()).await {
            Ok(id) => id,
            Err(Retry::Later(why)) => {
                let d = wait(&why, &mut backoff);
                tokio::select! { _ = tokio::time::sleep(d) => continue, _ = shutdown.cancelled() => return Ok(()) }
            }
            Err(Retry::Never(e)) => return Err(e),
        };
        // One session per relay of the cluster, each reconnecting on its own; back here
        // only to stop or to enroll again.
        let end = relays::run(&parts, identity, &shutdown).await;
        let pause = match end {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Renew => {
                must_enroll =
                    Some("the certificate is due for renewal and this relay cannot renew it over the session".into());
                continue;
            }
            SessionEnd::Revoked(why) => {
                error!(reason = %why, "the relay refused this agent's certificate; enrolling again with REGISTRATION_JWT");
                must_enroll = Some(format!("the relay refused the saved certificate ({why})"));
                continue;
            }
            SessionEnd::Ended(why) => {
                backoff.reset();
                wait(&why, &mut backoff)
            }
            SessionEnd::Lost(why) => wait(&why, &mut backoff),
        };
        tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = shutdown.cancelled() => return Ok(()) }
    }
}

/// Starts what lives as long as the agent: metrics (and their listener), the byte meter
/// (eBPF when it loads), the data path, and the private service's check.
fn start_parts(
    cfg: &AgentConfig,
    shutdown: &CancellationToken,
) -> (Arc<crate::meter::Meter>, Arc<DataPath>, Arc<crate::service::ServiceHealth>) {
    let handle = crate::metrics::install();
    raise_fd_limit();
    let (meter, why) = crate::meter::Meter::start(cfg.counter);
    match &why {
        None => info!(program = meter.counter().map_or("", |c| c.as_str()), "counting stream bytes with eBPF"),
        Some(why) => info!(reason = %why, "counting stream bytes in user space"),
    }
    crate::metrics::ebpf_enabled(why.is_none());
    let data_path = Arc::new(DataPath::new(cfg.data_path, cfg.ktls_engine));
    info!(path = data_path.default_path().as_str(), "data path: {}", data_path.describe());
    if let Some(w) = data_path.testing_knob_warning() {
        warn!("{w}");
    }
    match cfg.metrics_listen {
        // Ready for systemd once the listener is bound (metrics::serve says so).
        Some(addr) => drop(tokio::spawn(crate::metrics::serve(addr, handle))),
        None => crate::metrics::started(),
    }
    let target = format!("{}:{}", cfg.app_host, cfg.app_port);
    let service = Arc::new(crate::service::ServiceHealth::new(target.clone()));
    {
        let (service, interval, stop) = (service.clone(), cfg.service_check, shutdown.clone());
        tokio::spawn(async move { service.watch(interval, stop).await });
        tokio::spawn(sluice_datapath::buffers::trim_periodically(shutdown.clone()));
    }
    info!(
        relay = %cfg.relay_url, service = %target, name = %cfg.name, state_dir = %cfg.state_dir.display(),
        "sluice-agent starting"
    );
    log_proxy(cfg);
    (Arc::new(meter), data_path, service)
}

/// Says once how the agent reaches its relays: which proxy (password redacted), from
/// which variable, and which hosts `NO_PROXY` sends directly.
fn log_proxy(cfg: &AgentConfig) {
    let Some(p) = cfg.proxy() else { return };
    let (host, port) = (&cfg.relay_url.host, cfg.relay_url.port);
    info!(proxy = %p.describe(), from = p.source(), no_proxy = p.no_proxy().as_str(),
          "reaching the relays through an HTTP proxy (CONNECT; TLS end to end through it)");
    if p.bypasses(host, port) {
        info!(relay = %cfg.relay_url, no_proxy = p.no_proxy().as_str(), "NO_PROXY covers the relay: dialing it directly");
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs both. Each stream holds
/// two descriptors (its data connection and the service connection), so the common soft
/// default of 1024 would cap the agent near 500 streams with "too many open files".
fn raise_fd_limit() {
    match fd_limit::raise() {
        Ok((before, soft)) => info!(soft, raised_from = before, "file descriptor limit (RLIMIT_NOFILE)"),
        Err(e) => warn!(
            error = %e,
            "could not raise the file descriptor limit (RLIMIT_NOFILE); each stream needs two: raise it \
             (systemd LimitNOFILE=, docker --ulimit nofile=, ulimit -n) if streams fail with \"too many open files\""
        ),
    }
}

mod fd_limit {
    /// Raises the soft descriptor limit to the hard one (raising soft up to hard needs no
    /// privilege); returns the soft limit before and after.
    pub(crate) fn raise() -> std::io::Result<(u64, u64)> {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let before = lim.rlim_cur;
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            // SAFETY: setrlimit reads the struct we own.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim = raised;
        }
        Ok((before, lim.rlim_cur))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_soft_limit_reaches_the_hard_limit() {
            let (before, soft) = super::raise().unwrap();
            assert!(soft >= before);
            let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: getrlimit writes into the struct we own.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
            assert_eq!((lim.rlim_cur, soft), (lim.rlim_max, lim.rlim_max));
        }
    }
}

/// Why no identity could be had this round.
enum Retry {
    /// The relay could not be reached: try again after a backoff.
    Later(String),
    /// The relay refused for good (bad, revoked or expired JWT; wrong relay) or the
    /// state directory failed.
    Never(AgentError),
}

/// The identity for the next session: the saved one when it fits the configuration
/// (and `must_enroll` does not say why not), else a new enrollment with the JWT.
async fn identity(cfg: &AgentConfig, must_enroll: Option<String>) -> Result<enroll::Identity, Retry> {
    let saved = match must_enroll {
        Some(why) => Err(enroll::NoIdentity::Unusable(why)),
        None => enroll::load(cfg),
    };
    match saved {
        Ok(id) => return Ok(id),
        Err(enroll::NoIdentity::Mismatch(why)) => {
            warn!(state_dir = %cfg.state_dir.display(), "{why}: enrolling afresh with REGISTRATION_JWT")
        }
        Err(enroll::NoIdentity::Unusable(why)) => {
            info!(state_dir = %cfg.state_dir.display(), "{why}: enrolling again with REGISTRATION_JWT")
        }
        Err(enroll::NoIdentity::Missing) => {}
    }
    match enroll::enroll(cfg).await {
        Ok(id) => {
            crate::metrics::enrollment("enrolled");
            info!(resource = %id.meta.resource_id, name = %id.meta.resource_name, agent = %id.meta.agent_id, "enrolled");
            Ok(id)
        }
        Err(EnrollError::Rejected(r)) if !r.code.is_transient() => {
            crate::metrics::enrollment("rejected");
            Err(Retry::Never(AgentError::Fatal(format!("the relay refused this agent: {}", r.message))))
        }
        Err(EnrollError::Trust(m) | EnrollError::State(m)) => Err(Retry::Never(AgentError::Fatal(m))),
        Err(e) => Err(Retry::Later(e.to_string())),
    }
}
