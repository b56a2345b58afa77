//! Endpoint leases on the relay: each active lease has its own port from `--lease-ports`,
//! and a connection on it becomes a stream only when the relay admits it.
//!
//! Admission, on every accepted connection before any stream starts
//! ([`admit`]): the client's address must lie in the lease's `source` network (when it
//! has one), and the store must count the connection — it does so in one statement, only
//! while the lease is neither ended, expired nor spent, so a budget holds across every
//! relay sharing the store. A refused connection gets a TCP reset, a log line and
//! `sluice_relay_lease_refused_total{reason}`.
//!
//! Which ports a relay binds is decided by [`Leases::refresh`], every
//! [`REFRESH_INTERVAL`] and at once after a lease is created or deleted through this
//! relay: the active leases (read from the store, so a lease made on another relay is
//! learned within one interval) of resources this relay has a live agent session for.
//! A lease that ended (expired, deleted) has its port closed; its open streams are cut
//! after `--lease-grace`. A lease whose budget is spent ends when its last connection on
//! this relay closes (its streams were admitted within the budget and are not cut).
//!
//! A resource set leased-only (`sluice resources update --access leased`) keeps its
//! fixed port for compatibility, but the port refuses every connection
//! ([`Leases::is_leased_only`], reason `leased_only`).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use sluice_datapath as datapath;
use sluice_proto::identity::unix_now;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::relay::Relay;
use crate::state::store::{Lease, LeaseRefusal, Store};

/// How often each relay reads the active leases from the store: a lease created or
/// ended on another relay is honoured (or refused) here within this, plus one store call.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// A network in CIDR form (`10.1.2.3/32`, `2001:db8::/64`; a bare address is a /32 or
/// /128): the addresses a lease admits connections from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceNet {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for SourceNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a network: give an address with a prefix length, e.g. 10.1.2.3/32"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix =
            match prefix {
                None => max,
                Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                    format!("{s:?}: the prefix length must be a number from 0 to {max} for this address")
                })?,
            };
        Ok(SourceNet { addr, prefix })
    }
}

impl std::fmt::Display for SourceNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl SourceNet {
    /// Whether `ip` lies in this network (an IPv4 address seen as IPv4-mapped IPv6 counts
    /// as the IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Why a connection on a lease or fixed port was refused: the `reason` label of
/// `sluice_relay_lease_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client's address is outside the lease's source network.
    Source,
    /// The lease is past its expiry.
    Expired,
    /// The lease's connection budget is used up.
    Spent,
    /// The lease was deleted, or ended otherwise.
    Ended,
    /// The store could not count the connection (the relay fails closed).
    Unavailable,
    /// A connection on the fixed port of a leased-only resource.
    LeasedOnly,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Source => "source",
            Refusal::Expired => "expired",
            Refusal::Spent => "spent",
            Refusal::Ended => "ended",
            Refusal::Unavailable => "unavailable",
            Refusal::LeasedOnly => "leased_only",
        }
    }

    fn from_store(r: LeaseRefusal) -> Refusal {
        match r {
            LeaseRefusal::Unknown | LeaseRefusal::Ended => Refusal::Ended,
            LeaseRefusal::Expired => Refusal::Expired,
            LeaseRefusal::Spent => Refusal::Spent,
        }
    }
}

/// The source check, without I/O: admitted when the lease has no source network or the
/// client's address lies in it. A source the relay cannot parse admits nobody.
pub fn source_admits(source: Option<&str>, client: IpAddr) -> bool {
    match source {
        None => true,
        Some(s) => s.parse::<SourceNet>().is_ok_and(|net| net.contains(client)),
    }
}

/// A lease this relay has bound a port for.
struct LiveLease {
    lease: Lease,
    listener: AbortHandle,
    /// Cancelled `--lease-grace` after the lease ended: its open streams are cut.
    cut: CancellationToken,
    /// Streams open under it on this relay.
    open: Arc<AtomicUsize>,
}

/// The leases this relay serves, and which resources are leased-only.
#[derive(Default)]
pub struct Leases {
    live: Mutex<HashMap<String, LiveLease>>,
    leased_only: Mutex<HashSet<String>>,
    /// Leases whose port could not be bound (logged once each).
    bind_failed: Mutex<HashSet<String>>,
    /// One refresh at a time (the periodic one and those after an admin request).
    refreshing: tokio::sync::Mutex<()>,
    /// Asks the periodic refresh to run now (a lease spent here).
    wake: tokio::sync::Notify,
}

impl Leases {
    /// Whether the resource's fixed port must refuse every connection.
    pub fn is_leased_only(&self, resource_id: &str) -> bool {
        self.leased_only.lock().contains(resource_id)
    }

    /// Records a resource's access as set through this relay (others learn it from the
    /// store within [`REFRESH_INTERVAL`]).
    pub fn set_leased_only(&self, resource_id: &str, leased_only: bool) {
        let mut set = self.leased_only.lock();
        if leased_only {
            set.insert(resource_id.to_owned());
        } else {
            set.remove(resource_id);
        }
    }

    /// Reads the leased-only resources (at start, before any port opens).
    pub fn load(&self, store: &dyn Store) -> Result<(), crate::state::store::StoreError> {
        *self.leased_only.lock() = store.leased_only_resources()?.into_iter().collect();
        Ok(())
    }

    /// Streams open under a lease on this relay.
    pub fn open_streams(&self, lease_id: &str) -> usize {
        self.live.lock().get(lease_id).map_or(0, |l| l.open.load(Ordering::Relaxed))
    }

    /// Brings the bound lease ports in line with the store: ends what ended, binds the
    /// ports of active leases of resources with a live agent session here.
    pub async fn refresh(relay: &Arc<Relay>) -> Result<(), crate::state::store::StoreError> {
        let _one = relay.leases.refreshing.lock().await;
        let r = relay.clone();
        let read = tokio::task::spawn_blocking(move || {
            let now = unix_now();
            r.store.expire_leases(now)?;
            let active: Vec<Lease> = r
                .store
                .leases(None, u64::MAX)?
                .into_iter()
                .filter(|l| l.ended_at.is_none() && l.expires_at > now)
                .collect();
            Ok::<_, crate::state::store::StoreError>((active, r.store.leased_only_resources()?))
        })
        .await;
        let Ok(read) = read else { return Ok(()) };
        let (active, leased_only) = read?;
        *relay.leases.leased_only.lock() = leased_only.into_iter().collect();
        let active: HashMap<String, Lease> = active.into_iter().map(|l| (l.id.clone(), l)).collect();
        // Ports of leases that ended, or whose resource has no agent here any more.
        let gone: Vec<LiveLease> = {
            let mut live = relay.leases.live.lock();
            let ids: Vec<String> = live
                .iter()
                .filter(|(id, l)| {
                    !active.contains_key(*id) || relay.registry.sessions_of(&l.lease.resource_id).is_empty()
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter().filter_map(|id| live.remove(&id)).collect()
        };
        for l in gone {
            l.listener.abort();
            if active.contains_key(&l.lease.id) {
                continue; // The agent left: its streams end with its session.
            }
            let ended = relay.store.lease(&l.lease.id).ok().flatten();
            let reason = ended.as_ref().and_then(|e| e.end_reason.clone()).unwrap_or_else(|| "deleted".into());
            let open = l.open.load(Ordering::Relaxed);
            if reason == "spent" {
                info!(lease = %l.lease.id, port = l.lease.port, "lease spent: its port is closed");
                continue;
            }
            let grace = relay.config.lease_grace;
            info!(lease = %l.lease.id, port = l.lease.port, %reason, open_streams = open,
                "lease ended: its port is closed; its open streams are cut in {grace:?} (--lease-grace)");
            let cut = l.cut.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                cut.cancel();
            });
        }
        for (id, lease) in active {
            if relay.leases.live.lock().contains_key(&id) || relay.registry.sessions_of(&lease.resource_id).is_empty() {
                continue;
            }
            let addr = SocketAddr::new(relay.config.resource_bind, lease.port);
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    if relay.leases.bind_failed.lock().insert(id.clone()) {
                        warn!(lease = %id, %addr, error = %e, "cannot listen on the lease's port: its holder cannot \
                              connect through this relay until it is free (another process holds it? `ss -ltnp \
                              'sport = :{}'`); the relay tries again every {REFRESH_INTERVAL:?}", lease.port);
                    }
                    continue;
                }
            };
            relay.leases.bind_failed.lock().remove(&id);
            let cut = CancellationToken::new();
            let open = Arc::new(AtomicUsize::new(0));
            let name = relay.store.resource(&lease.resource_id).ok().flatten().map(|r| r.name).unwrap_or_default();
            let task = tokio::spawn(
                accept_loop(relay.clone(), lease.clone(), listener, cut.clone(), open.clone(), name)
                    .instrument(info_span!(parent: None, "lease", id = %id, resource = %lease.resource_id)),
            );
            info!(lease = %id, %addr, "lease port listening");
            relay.leases.live.lock().insert(id, LiveLease { lease, listener: task.abort_handle(), cut, open });
        }
        Ok(())
    }
}

/// Refreshes the lease ports every [`REFRESH_INTERVAL`] until the relay stops.
pub async fn run(relay: Arc<Relay>) {
    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = relay.leases.wake.notified() => {}
            _ = relay.shutdown.cancelled() => return,
        }
        match Leases::refresh(&relay).await {
            Ok(()) if failing => {
                failing = false;
                info!("leases: the store answers again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "leases: could not read the active leases from the store; the lease ports \
                       bound stay as they are, and new connections on them are refused until it answers");
            }
            Err(_) => {}
        }
    }
}

static REFUSALS: crate::admission::Throttle = crate::admission::Throttle::new(crate::admission::LOG_EVERY);
static ACCEPT_ERRORS: crate::admission::Throttle = crate::admission::Throttle::new(crate::admission::LOG_EVERY);

/// Logs and counts one refused connection, and resets it.
///
/// The refusal goes to the audit trail too (a record of kind `stream` ending
/// `refused`, no bytes), as often as it is logged: a flood of refused connections makes
/// one record per log interval, with how many were refused since the last.
pub fn refuse(
    relay: &Relay,
    client: &tokio::net::TcpStream,
    peer: SocketAddr,
    (resource_id, resource_name): (&str, &str),
    lease: Option<&str>,
    why: Refusal,
) {
    // Counted and logged before the reset: whoever sees the reset finds both.
    crate::metrics::lease_refused(why.label());
    if let Some(held_back) = REFUSALS.due() {
        let what = match why {
            Refusal::Source => "the client's address is outside the lease's source network",
            Refusal::Expired => "the lease expired",
            Refusal::Spent => "the lease's connection budget is used up",
            Refusal::Ended => "the lease was deleted or ended",
            Refusal::Unavailable => "the store could not count the connection (see /readyz)",
            Refusal::LeasedOnly => {
                "the resource is leased-only: connect through a lease's port (`sluice leases create`)"
            }
        };
        info!(client = %peer, resource = %resource_id, lease = lease.unwrap_or("-"), reason = why.label(),
              refused_since_last_line = held_back, "connection refused with a reset: {what}");
        let now = crate::audit::now_ms();
        let more =
            if held_back > 0 { format!(" ({held_back} more refused since the last record)") } else { String::new() };
        relay.audit.stream(crate::state::store::StreamRecord {
            resource_id: resource_id.to_owned(),
            resource_name: resource_name.to_owned(),
            agent_id: "-".into(),
            client_addr: peer.to_string(),
            started_at_ms: now,
            ended_at_ms: now,
            bytes_in: 0,
            bytes_out: 0,
            end: "refused".into(),
            end_detail: format!("{}: {what}{more}", why.label()),
            path: "-".into(),
            lease_id: lease.map(str::to_owned),
        });
    }
    datapath::reset(client);
}

/// Decides one connection on a lease port: source first (no store call for strangers),
/// then the store's atomic count.
async fn admit(relay: &Arc<Relay>, lease: &Lease, peer: SocketAddr) -> Result<(), Refusal> {
    if !source_admits(lease.source.as_deref(), peer.ip()) {
        return Err(Refusal::Source);
    }
    let (r, id) = (relay.clone(), lease.id.clone());
    match tokio::task::spawn_blocking(move || r.store.use_lease(&id, unix_now())).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(why))) => Err(Refusal::from_store(why)),
        Ok(Err(_)) | Err(_) => Err(Refusal::Unavailable),
    }
}

/// Accepts on one lease's port until the lease ends here or the relay stops.
async fn accept_loop(
    relay: Arc<Relay>,
    lease: Lease,
    listener: TcpListener,
    cut: CancellationToken,
    open: Arc<AtomicUsize>,
    resource_name: String,
) {
    let gate = crate::admission::Gate::new("resource", relay.config.limits.max_streams_per_resource);
    let mut backoff = crate::admission::AcceptBackoff::new();
    let lease = Arc::new(lease);
    loop {
        let (client, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => { backoff.after_error("resource", &e, &ACCEPT_ERRORS).await; continue }
            },
            _ = relay.shutdown.cancelled() => return,
        };
        backoff.succeeded();
        let (relay, lease, cut, open, name) =
            (relay.clone(), lease.clone(), cut.clone(), open.clone(), resource_name.clone());
        let Some(slot) = gate.try_admit() else {
            datapath::reset(&client);
            crate::metrics::stream_failed(&lease.resource_id, "limit");
            continue;
        };
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(why) = admit(&relay, &lease, peer).await {
                refuse(&relay, &client, peer, (&lease.resource_id, &name), Some(&lease.id), why);
                return;
            }
            open.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_nodelay(true);
            let stream_id = relay.next_stream_id();
            crate::data::resource_port::forward(
                relay.clone(),
                lease.resource_id.clone(),
                name,
                client,
                peer,
                stream_id,
                Some((lease.id.clone(), cut)),
            )
            .instrument(info_span!("stream", id = stream_id, client = %peer, lease = %lease.id))
            .await;
            let last = open.fetch_sub(1, Ordering::Relaxed) == 1;
            if last && lease.max_connections.is_some() {
                end_if_spent(&relay, &lease.id).await;
            }
        });
    }
}

/// Ends a lease whose budget is spent once its last connection here has closed.
async fn end_if_spent(relay: &Arc<Relay>, lease_id: &str) {
    let (r, id) = (relay.clone(), lease_id.to_owned());
    let ended = tokio::task::spawn_blocking(move || {
        let l = r.store.lease(&id)?;
        match l {
            Some(l)
                if l.ended_at.is_none() && l.max_connections.is_some_and(|m| l.connections_used >= u64::from(m)) =>
            {
                r.store.end_lease(&id, "spent", unix_now()).map(|_| true)
            }
            _ => Ok(false),
        }
    })
    .await;
    if matches!(ended, Ok(Ok(true))) {
        relay.leases.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_contain() {
        let net: SourceNet = "10.1.2.3/32".parse().unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("10.1.2.4".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()), "IPv4-mapped IPv6 is the IPv4 address");
        let net: SourceNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.9".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        let all: SourceNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!(!all.contains("2001:db8::1".parse().unwrap()), "an IPv4 network holds no IPv6 address");
        let v6: SourceNet = "2001:db8::/64".parse().unwrap();
        assert!(v6.contains("2001:db8::42".parse().unwrap()));
        assert!(!v6.contains("2001:db9::42".parse().unwrap()));
        assert_eq!("127.0.0.1".parse::<SourceNet>().unwrap().to_string(), "127.0.0.1/32");
        assert!("10.0.0.0/33".parse::<SourceNet>().is_err());
        assert!("nonsense/8".parse::<SourceNet>().is_err());
    }

    #[test]
    fn the_source_check_admits_only_the_holders_network() {
        let here: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(source_admits(None, other));
        assert!(source_admits(Some("127.0.0.1/32"), here));
        assert!(!source_admits(Some("127.0.0.1/32"), other));
        assert!(!source_admits(Some("garbage"), here), "an unreadable source admits nobody");
    }
}
